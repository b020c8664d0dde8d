"""Who may use the gateway: API keys and JWTs, callers without credentials, rate limits.

Every route but ``/health`` (and ``/auth/login``, which hands out JWTs) goes through
:class:`AuthMiddleware`, so a route added later is covered too:

- ``Authorization: Bearer <API key or JWT>`` (on ``/ws`` also ``?token=``): a wrong, expired
  or revoked credential is refused with 401, from anywhere, always;
- no credential: allowed from this PC itself (see :func:`is_local`), refused with 401 from the
  LAN unless the admin allowed anonymous access (``tiktrue gateway allow-anonymous on``,
  ``<data>/gateway.json``, read on every request). ``/ws`` is the exception: its connection
  opens, and answers nothing but ``authentication`` (seed 003; ``license_key`` or ``token``
  taken as an API key or JWT) and ``heartbeat`` until one succeeds;
- each HTTP request, and each inference request on ``/ws``, counts against the caller's
  account and key limits (429 with ``Retry-After``; on ``/ws`` an error ``rate_limited``),
  and is refused the same way once the day's token quota is used up (the tokens of each
  answer are counted when it ends: ``count_tokens``, called by the node service's answer
  listener with :func:`current_caller`).

Routes read the caller with :func:`caller_of` to keep to a key's networks and to give each
conversation its owner.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from tiktrue.gateway.http_errors import error_body
from tiktrue.paths import write_text_atomic
from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.local_peers import is_local
from tiktrue.security.users import (
    ANONYMOUS,
    InvalidCredentials,
    Principal,
    UserError,
    UserStore,
)

SETTINGS_FILE = "gateway.json"
OPEN_PATHS = frozenset({"/health", "/auth/login"})
SCOPE_KEY = "tiktrue.caller"  # where the middleware leaves the caller in the ASGI scope
# the caller of the request being served, for what runs beneath the route: the gateway's
# answer listener counts an answer's tokens against its account's and key's quotas
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "tiktrue_caller", default=None
)


def current_caller() -> Principal | None:
    """The caller of the HTTP request or ``/ws`` message being served (None: none known)."""
    return _CALLER.get()


# --- settings ---------------------------------------------------------------------------------


def settings_path(data_dir: Path) -> Path:
    return Path(data_dir) / SETTINGS_FILE


def read_settings(data_dir: Path) -> dict:
    path = settings_path(data_dir)
    try:
        return json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # unreadable: the safe defaults (no anonymous access from the LAN)


def set_allow_anonymous(data_dir: Path, allowed: bool) -> None:
    """Let callers without a key in from the LAN (or not); takes effect at the next request."""
    settings = {**read_settings(data_dir), "allow_anonymous": bool(allowed)}
    write_text_atomic(settings_path(data_dir), json.dumps(settings, indent=2))


def allow_anonymous(data_dir: Path | None) -> bool:
    return data_dir is not None and read_settings(data_dir).get("allow_anonymous") is True


# --- credentials -----------------------------------------------------------------------------


def credential_of(scope: dict) -> str | None:
    """The bearer credential of a request: the ``Authorization`` header, or on a WebSocket
    (browsers cannot set its headers) the ``token`` query parameter."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else value.decode("latin-1")
    if scope["type"] == "websocket":
        tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if tokens:
            return tokens[0]
    return None


class Login(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class GatewayAuth:
    """The gateway's checks, on the accounts of ``data_dir`` (None: no accounts here, so every
    credential is refused and only this PC's callers get in)."""

    def __init__(self, data_dir: Path | None, users: UserStore | None = None) -> None:
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.users = users or (UserStore(self.data_dir) if self.data_dir is not None else None)

    async def _users(self, method: str, *args):
        if self.users is None:
            raise InvalidCredentials("this gateway has no accounts: credentials are not accepted")
        return await asyncio.to_thread(getattr(self.users, method), *args)

    async def verify(self, credential: str) -> Principal:
        return await self._users("authenticate", credential)

    def anonymous_allowed(self, client: str | None, server: str | None) -> bool:
        return is_local(client, server) or allow_anonymous(self.data_dir)

    async def identify(self, scope: dict) -> Principal | None:
        """The caller of an HTTP request or WebSocket; None: a WebSocket that must still send
        ``authentication``. Raises InvalidCredentials (401)."""
        credential = credential_of(scope)
        if credential:
            return await self.verify(credential)
        client = (scope.get("client") or (None,))[0]
        server = (scope.get("server") or (None,))[0]
        if self.anonymous_allowed(client, server):
            return ANONYMOUS
        if scope["type"] == "websocket":
            return None
        raise InvalidCredentials(
            "an API key is needed from the LAN: send 'Authorization: Bearer <key>' "
            "(the admin makes keys with: tiktrue keys create)"
        )

    async def count(self, caller: Principal) -> None:
        """One more request of ``caller``; raises RateLimited (429)."""
        if not caller.anonymous:
            await self._users("hit", caller)

    def count_tokens(self, caller: Principal, tokens: int) -> None:
        """An answer of ``caller`` used ``tokens``: counted against its quotas (blocking: the
        caller runs it in a thread)."""
        if self.users is not None and not caller.anonymous:
            self.users.count_tokens(caller, tokens)

    def connection(self, ws) -> Connection:
        """The caller of an accepted ``/ws`` connection, as the middleware found it."""
        return Connection(self, ws.scope.get(SCOPE_KEY))

    def router(self) -> APIRouter:
        """``POST /auth/login``: an account's name and password for a JWT."""
        router = APIRouter()

        @router.post("/auth/login")
        async def login(body: Login) -> dict:
            try:
                token = await self._users("login", body.username, body.password)
            except UserError as exc:
                raise http_error(exc) from None
            ttl = self.users.jwt_ttl_s if self.users else 0
            return {"access_token": token, "token_type": "bearer", "expires_in": int(ttl)}

        return router


def http_error(exc: UserError) -> HTTPException:
    headers = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return HTTPException(exc.status, detail=exc.message, headers=headers or None)


def caller_of(connection) -> Principal:
    """The caller the middleware found for a Request or WebSocket."""
    return connection.scope.get(SCOPE_KEY) or ANONYMOUS


def require_network(caller: Principal, network_id: str) -> None:
    """A key limited to other networks does not reach ``network_id`` (403)."""
    if not caller.allows(network_id):
        raise HTTPException(403, detail=f"this API key is not for network {network_id}")


class AuthMiddleware:
    """ASGI middleware: identify every caller (but on ``OPEN_PATHS``, and the web UI's paths,
    ``ui_paths``: its pages ask for a login themselves), refuse or count it."""

    def __init__(self, app, auth: GatewayAuth, ui_paths: Callable[[str], bool] | None = None):
        self.app = app
        self.auth = auth
        self.ui_paths = ui_paths or (lambda path: False)

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or scope["path"] in OPEN_PATHS
            or self.ui_paths(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        try:
            caller = await self.auth.identify(scope)
            if scope["type"] == "http":
                await self.auth.count(caller)
        except UserError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        scope[SCOPE_KEY] = caller
        _CALLER.set(caller)
        await self.app(scope, receive, send)

    async def _refuse(self, exc: UserError, scope, receive, send) -> None:
        error = http_error(exc)
        body = error_body(exc.message, exc.status, exc.code)
        response = JSONResponse(body, status_code=exc.status, headers=error.headers)
        if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
            await response(scope, receive, send)
        else:  # a server without denial responses: close the handshake (HTTP 403)
            await send({"type": "websocket.close", "code": 1008})


class Connection:
    """One ``/ws`` connection's caller: set at the handshake or by an ``authentication``
    message; a failed ``authentication`` leaves the connection with no access."""

    def __init__(self, auth: GatewayAuth, caller: Principal | None) -> None:
        self.auth = auth
        self.caller = caller

    @property
    def owner(self) -> str | None:
        return None if self.caller is None else self.caller.owner

    async def authenticate(self, message: ps.Authentication) -> str:
        credential = message.license_key or message.token or ""
        try:
            self.caller = await self.auth.verify(credential)
        except UserError as exc:
            self.caller = None
            raise _protocol_error(exc, message.message_id, None) from None
        return f"authenticated as {self.caller.user_name}"

    def check(self, network_id: str, message_id: str | None, session_id: str | None) -> str | None:
        """Refuse a connection that has not authenticated, or a key of another network;
        returns the owner for the session."""
        if self.caller is None:
            raise ps.ProtocolError(
                ps.UNAUTHORIZED,
                "send an authentication message with your API key first (license_key), or "
                "connect with 'Authorization: Bearer <key>'",
                message_id,
                session_id,
            )
        if not self.caller.allows(network_id):
            why = f"this API key is not for network {network_id}"
            raise ps.ProtocolError(ps.FORBIDDEN, why, message_id, session_id)
        return self.caller.owner

    async def admit(self, network_id: str, message_id: str | None, session_id: str | None):
        """``check``, then count one request against the caller's limits."""
        owner = self.check(network_id, message_id, session_id)
        try:
            await self.auth.count(self.caller)
        except UserError as exc:
            raise _protocol_error(exc, message_id, session_id) from None
        _CALLER.set(self.caller)  # this message's task: its answer's tokens count for it
        return owner


def _protocol_error(exc: UserError, message_id, session_id) -> ps.ProtocolError:
    code = {401: ps.UNAUTHORIZED, 403: ps.FORBIDDEN, 429: ps.RATE_LIMITED}.get(
        exc.status, ps.INVALID_MESSAGE
    )
    return ps.ProtocolError(code, exc.message, message_id, session_id)
