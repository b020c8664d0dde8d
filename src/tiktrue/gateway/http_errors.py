"""Errors of the gateway's HTTP API in the OpenAI API's shape, and the one table that says
which HTTP status each refusal of the network gets.

``{"error": {"message", "type", "param", "code"}}`` is what OpenAI clients read (the official
client raises ``BadRequestError`` and friends from it); a refusal with numbers behind it (a
context length) carries them beside. A client's mistake is a 4xx and never a 5xx: only the
network failing to answer is a 503.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi.responses import JSONResponse

from tiktrue.protocol import protocol_spec as ps

log = logging.getLogger("tiktrue.gateway")

# protocol and chain error codes -> HTTP status; anything else: the network could not answer
STATUS = {
    ps.CONTEXT_LENGTH_EXCEEDED: 400,
    ps.INVALID_MESSAGE: 400,
    ps.MALFORMED_JSON: 400,
    ps.UNKNOWN_MESSAGE_TYPE: 400,
    ps.FRAME_TOO_LARGE: 400,
    ps.BAD_TENSOR: 400,
    "bad_shape": 400,  # model.errors.ShapeError: e.g. a token id outside the vocabulary
    ps.UNAUTHORIZED: 401,
    ps.FORBIDDEN: 403,
    ps.SESSION_NOT_FOUND: 404,
    ps.WRONG_NETWORK: 404,
    ps.RATE_LIMITED: 429,
}
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """A refusal the HTTP API answers as ``status`` with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        param: str | None = None,
        info: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param, self.info, self.headers = param, info, headers

    def body(self) -> dict:
        return error_body(self.message, self.status, self.code, param=self.param, info=self.info)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str,
    status: int,
    code: str | None = None,
    *,
    param: str | None = None,
    info: dict[str, Any] | None = None,
) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code}
    return {"error": {**error, **(info or {})}}


def from_network(exc: Exception, *, param: str | None = None) -> APIError:
    """The HTTP refusal of a gateway, chain or model error (their ``code``, a message for the
    caller and numbers): a 4xx for the client's mistakes, 503 when the network could not
    answer."""
    code, message, info = public_error(exc)
    status = STATUS.get(code, 503)
    return APIError(status, message, code, param=param if status == 400 else None, info=info)


INTERNAL_MESSAGE = "the network could not answer (an internal error; the node's log says more)"
# what a caller is told when the network failed, by code (its own words stay in the log)
PLAIN = {
    ps.INTERNAL_ERROR: INTERNAL_MESSAGE,
    "peer_unavailable": "the network could not answer: a PC of the network could not be reached",
}
# refusals of the client's request, and a damaged block (which names the block), in our own
# words: their message is passed on, scrubbed of anything like a path
SAFE = (set(STATUS) - {ps.MALFORMED_JSON, ps.BAD_TENSOR}) | {"corrupt_block"}
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.~$-]+){2,}[\\/]?")


def public_error(exc: Exception) -> tuple[str, str, dict[str, Any] | None]:
    """(code, message, info) of an error for the caller: the client's own mistakes in the
    gateway's words; the network's failures in plain words by code, their details (which may
    hold server paths or a node's exception text) logged here instead."""
    code = getattr(exc, "code", None) or ps.INTERNAL_ERROR
    message = getattr(exc, "message", None) or str(exc)
    info = getattr(exc, "info", None)
    if code in SAFE or code == ps.CONTEXT_LENGTH_EXCEEDED:
        return code, _PATH.sub("<path>", message), info
    log.warning("the network could not answer (%s): %s", code, message)
    return code, PLAIN.get(code, f"the network could not answer ({code})"), None
