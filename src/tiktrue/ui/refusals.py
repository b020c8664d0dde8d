"""Refusals from below the UI, told to a person in their language.

The layers under the UI (accounts, the chain, the control plane) refuse with a ``code`` and an
English message for logs and APIs. A page shows the translation of the code where it knows
it, with the numbers the refusal carries; a code it does not know is shown as a translated
lead with the lower layer's own words after it (an id, a path or a peer's words inside them
cannot be translated anyway). :class:`~tiktrue.ui.i18n.Message` texts are translated as
they are.
"""

from __future__ import annotations

import re

from tiktrue.security.users import MIN_PASSWORD_CHARS, RateLimited, UserError
from tiktrue.ui.i18n import N_, SOURCE, Message, _, current, size_text, translate

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
    if current() is SOURCE:  # the words are English already
        return str(detail)
    return _("Refused: {detail}", detail=str(detail))


_SIZE = r"(-?[\d.]+ [KMGTP]?B)"
_NEEDS_RAM = re.compile(
    rf"the model needs {_SIZE} more RAM: {_SIZE} of weights and KV for (\d+) tokens, "
    rf"the nodes give {_SIZE} \(after the runtime of each node\)"
)
_NEEDS_DISK = re.compile(
    rf"the model needs {_SIZE} more disk: {_SIZE} of weights, the nodes give {_SIZE}"
)


def plan_refusal(verdict: str) -> str:
    """Why no plan fits (the planner's words, ``planner._explain``), in the person's
    language: its two common cases with their figures, else as :func:`refused`."""
    ram = _NEEDS_RAM.fullmatch(verdict)
    if ram:
        return _(
            "The model needs {missing} more RAM: {needed} of weights and KV cache for {tokens} "
            "tokens, and the nodes give {given} (after each node's runtime).",
            missing=size_text(ram[1]),
            needed=size_text(ram[2]),
            tokens=int(ram[3]),
            given=size_text(ram[4]),
        )
    disk = _NEEDS_DISK.fullmatch(verdict)
    if disk:
        return _(
            "The model needs {missing} more disk: {needed} of weights, and the nodes give {given}.",
            missing=size_text(disk[1]),
            needed=size_text(disk[2]),
            given=size_text(disk[3]),
        )
    return refused(verdict)
