"""One typed error for every refusal of an admin operation, whichever layer refused it.

The operations call the control plane, the block store and the accounts, each with its own
exceptions; the dashboard shows ``message`` to a person and the JSON API answers
``{"error": {"code", "message"}}`` with ``status``. Anything else is a bug: ``internal_error``.
"""

from __future__ import annotations

from pydantic import ValidationError

from tiktrue.control.network_admin import REFUSALS
from tiktrue.control.planner import PlanError
from tiktrue.node.control_link import ControlError
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol.network_config import ConfigError
from tiktrue.security.auth_manager import SecurityError
from tiktrue.security.users import UserError
from tiktrue.ui.i18n import N_


class AdminError(Exception):
    """A refusal: ``code`` for scripts, ``message`` for people, ``status`` for HTTP."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


# refusals whose class carries no ``code`` of its own
_CODES = (
    (PlanError, "plan_refused", 409),
    (ConfigError, "config_error", 409),
    (SecurityError, "security_error", 403),
)


def as_admin_error(exc: BaseException) -> AdminError:
    """The ``AdminError`` for any exception an operation lets out."""
    if isinstance(exc, AdminError):
        return exc
    if isinstance(exc, UserError):
        return AdminError(exc.code, exc.message, exc.status)
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        return AdminError("bad_request", problems, 400)
    if isinstance(exc, (ControlError, PeerUnavailable)):
        code = getattr(exc, "code", "peer_unavailable")
        return AdminError(code, N_("a node did not do it: {detail}", detail=str(exc)), 502)
    if isinstance(exc, REFUSALS):
        for kind, code, status in _CODES:
            if isinstance(exc, kind):
                return AdminError(code, str(exc), status)
        return AdminError(getattr(exc, "code", "refused"), str(exc), 400)
    return AdminError("internal_error", f"{type(exc).__name__}: {exc}", 500)
