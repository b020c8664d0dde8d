"""Refusals from below the UI, told to a person in their language.

The layers under the UI (accounts, the chain, the control plane) refuse with a ``code`` and an
English message for logs and APIs. A page shows the translation of the code where it knows
it, with the numbers the refusal carries; a code it does not know is shown as a translated
lead with the lower layer's own words after it (an id, a path or a peer's words inside them
cannot be translated anyway). :class:`~tiktrue.ui.i18n.Message` texts are translated as
they are.
"""

from __future__ import annotations

from tiktrue.security.users import MIN_PASSWORD_CHARS, RateLimited, UserError
from tiktrue.ui.i18n import N_, Message, _, translate

_BY_CODE = {
    "invalid_credentials": N_("Wrong account name or password."),
    "credentials_expired": N_("Your login has expired: log in again."),
    "key_revoked": N_("This API key was revoked."),
    "forbidden": N_("This account may not do that."),
    "not_found": N_("It does not exist (any more)."),
    "conflict": N_("It exists already, or was just changed by someone else."),
}


def account_refusal(exc: UserError) -> str:
    """An account's refusal (log in, a new account, a limit) in the person's language."""
    if isinstance(exc, RateLimited):
        return _("Too many requests for now: try again in {seconds} s.", seconds=exc.retry_after)
    if exc.code in _BY_CODE:
        return translate(_BY_CODE[exc.code])
    return refused(exc.message)


def password_problem(password: str) -> str | None:
    """What is wrong with a new password, before the account store says it in English."""
    if len(password) < MIN_PASSWORD_CHARS:
        return _("A password needs at least {n} characters.", n=MIN_PASSWORD_CHARS)
    return None


def refused(detail: object) -> str:
    """A refusal whose words come from below the UI: translated when it is a ``Message``,
    else a translated lead and the words as they are."""
    if isinstance(detail, Message):
        return translate(detail)
    return _("Refused: {detail}", detail=str(detail))
