"""Errors of the gateway's HTTP API in the OpenAI API's shape, and the one table that says
which HTTP status each refusal of the network gets.

``{"error": {"message", "type", "param", "code"}}`` is what OpenAI clients read (the official
client raises ``BadRequestError`` and friends from it); a refusal with numbers behind it (a
context length) carries them beside. A client's mistake is a 4xx and never a 5xx: only the
network failing to answer is a 503.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from tiktrue.protocol import protocol_spec as ps

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
    """The HTTP refusal of a gateway, chain or model error (their ``code``, ``message`` and
    numbers): a 4xx for the client's mistakes, 503 when the network could not answer."""
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    status = STATUS.get(code, 503)
    if status == 503:
        message = f"the network could not answer: {message}"
    info = getattr(exc, "info", None)
    return APIError(status, message, code, param=param if status == 400 else None, info=info)
