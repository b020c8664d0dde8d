"""How the gateway's HTTP app (web UI, login, OpenAI API, ``/ws``) is served: HTTPS on LAN
addresses, plain HTTP on loopback only.

- On a LAN address (the default: ``tiktrue node`` takes the PC's LAN address) the app is
  served over HTTPS (TLS 1.3) with the certificate ``security.gateway_tls`` chooses: the
  node's certificate from its network's CA, or a self-signed one before it is in a network.
  Nothing answers in clear there: a plain ``http://`` request to that port fails at the TLS
  handshake, so no password, JWT or API key ever crosses the LAN in clear.
- Beside it, the same app listens in plain HTTP on ``127.0.0.1`` at the same port (another
  port if that one is taken): this PC's own window (``tiktrue app``), ``tiktrue chat`` and
  scripts use it without any certificate, and nobody else can reach it.
- On loopback alone (``--local``, the demo, the test clusters) only plain HTTP.

Both servers are uvicorn inside the node's event loop (the node owns the signals); the UI's
lifespan runs with the first one only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from tiktrue.node.lan_address import LOOPBACK, is_loopback, is_unspecified, lan_addresses
from tiktrue.security.gateway_tls import GatewayTls

log = logging.getLogger("tiktrue.gateway")
# at stop: how long answers in flight (an SSE stream, a /ws answer waiting on a hung node, the
# UI's socket) may take to end before uvicorn cancels them; without it, it waits for ever
HTTP_STOP_S = 1.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our loop: the node, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn binds one (SO_REUSEADDR off Windows: a
    port in TIME_WAIT is free); raises ``OSError`` naming the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{host}:{port} cannot be used ({exc.strerror})") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class GatewayHttp:
    """The gateway's listeners for ``app`` on ``host:port`` (see the module).

    ``tls``: None decides by the address (HTTPS unless loopback); True serves HTTPS even on
    loopback (tests of the HTTPS path on one PC)."""

    def __init__(
        self,
        app,
        data_dir: Path,
        host: str,
        port: int,
        *,
        lifespan: str = "off",
        tls: bool | None = None,
    ) -> None:
        self.app, self.data_dir = app, Path(data_dir)
        self.host, self.port = host, port
        self.lifespan = lifespan
        self.tls_wanted = not is_loopback(host) if tls is None else tls
        self.tls: GatewayTls | None = None
        self._servers: list[tuple[_EmbeddedServer, asyncio.Task]] = []
        self.local_base: str | None = None  # what this PC's own programs use
        self.lan_base: str | None = None  # what other PCs use (https), None on loopback

    def _lan_hosts(self) -> list[str]:
        if is_unspecified(self.host):
            return lan_addresses() or [LOOPBACK]
        return [self.host]

    async def start(self) -> None:
        if self.tls_wanted:
            self.tls = GatewayTls(self.data_dir, self._lan_hosts())
        port = await self._serve(self.host, self.port, tls=self.tls_wanted, lifespan=True)
        if self.tls_wanted:
            self.lan_base = f"https://{_url_host(self._lan_hosts()[0])}:{port}"
            self.local_base = self.lan_base if is_loopback(self.host) else None
        else:
            self.local_base = f"http://{_url_host(self.host)}:{port}"
        if self.tls_wanted and not is_loopback(self.host) and not is_unspecified(self.host):
            local_port = await self._serve_loopback(port)
            self.local_base = f"http://{LOOPBACK}:{local_port}" if local_port else self.lan_base
        log.info("gateway: this PC at %s, other PCs at %s", self.local_base, self.lan_base)

    async def _serve_loopback(self, port: int) -> int | None:
        """Plain HTTP for this PC's own programs, on the LAN port if free, else any."""
        for wanted in (port, 0):
            try:
                return await self._serve(LOOPBACK, wanted, tls=False, lifespan=False)
            except OSError as exc:
                log.warning(
                    "gateway: %s:%d is taken for this PC's own use: %s", LOOPBACK, wanted, exc
                )
        return None

    async def _serve(self, host: str, port: int, *, tls: bool, lifespan: bool) -> int:
        """One uvicorn on a socket bound here (a bind error is an ``OSError`` saying where,
        not uvicorn's exit, which would end the node's event loop)."""
        sock = _bind(host, port)
        options = {}
        if tls:
            assert self.tls is not None
            context = self.tls.context
            options["ssl_context_factory"] = lambda config, default: context
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            lifespan=self.lifespan if lifespan else "off",
            timeout_graceful_shutdown=HTTP_STOP_S,
            **options,
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise OSError(f"the gateway could not listen on {host}:{port}")
            await asyncio.sleep(0.05)
        self._servers.append((server, task))
        return sock.getsockname()[1]

    def refresh_tls(self) -> bool:
        """Serve the certificate of the current choice (a network created or joined, a
        renewal); whether it changed."""
        return self.tls.refresh() if self.tls is not None else False

    def describe(self) -> dict:
        """Where the gateway is and what a browser must trust (for the UI and ``node_info``)."""
        certificate = self.tls.certificate if self.tls is not None else None
        return {
            "local_url": self.local_base,
            "lan_url": self.lan_base,
            "tls": certificate.describe() if certificate is not None else None,
        }

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._servers), return_exceptions=True)
        self._servers.clear()


def trust_router(gateway: Callable[[], GatewayHttp | None]) -> APIRouter:
    """``/tls/ca.crt``: the certificate a browser trusts for this gateway (the network CA's,
    or the self-signed one), for anyone (it is public, and needed before a login);
    ``/tls/info``: the addresses and fingerprints (``GatewayHttp.describe``)."""
    router = APIRouter()

    @router.get("/tls/ca.crt")
    async def ca_certificate() -> Response:
        http = gateway()
        certificate = http.tls.certificate if http is not None and http.tls else None
        if certificate is None:
            raise HTTPException(404, "this gateway serves plain HTTP on loopback only")
        name = f"tiktrue-{certificate.network_id or 'node'}-ca.crt"
        return Response(
            certificate.trust_pem,
            media_type="application/x-x509-ca-cert",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.get("/tls/info")
    async def tls_info() -> dict:
        http = gateway()
        return http.describe() if http is not None else {"local_url": None, "lan_url": None}

    return router
