"""A node's metrics port for one network, where the node runs no gateway (a gateway serves
``/metrics`` on its own port): HTTPS with the node's certificate of that network, so a
scraper checks it against the network's CA like any member would.

Who may read (``security.access_control.METRICS_READERS``): a certificate of the network
(a member, or the read-only ``monitor`` certificate made for Prometheus) that the network has
not revoked, or a caller on this PC itself without one. It serves only this network's series
and the node's own (a node in two networks does not show one network's figures to the
other's members). The port is any free one; the node tells its admin in every heartbeat
(``metrics``), and the admin keeps Prometheus's targets current (``tiktrue ops prometheus``).

Served by ``websockets``' HTTP handling (``process_request``), which gives the TLS peer's
certificate; nothing here is a WebSocket.
"""

from __future__ import annotations

import http
import logging
import ssl
from collections.abc import Callable

import websockets
from cryptography import x509
from websockets.datastructures import Headers
from websockets.http11 import Response

from tiktrue.security.access_control import METRICS_READERS
from tiktrue.security.auth_manager import IdentityError, certificate_info
from tiktrue.security.local_peers import is_local
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.metrics")
PATH = "/metrics"

# render(accept, network_id) -> (body, content type)
Render = Callable[[str | None, str], tuple[bytes, str]]


class MetricsServer:
    def __init__(
        self,
        network_id: str,
        credentials: NetworkCredentials,
        render: Render,
        revoked: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.network_id = network_id
        self.render = render
        self.revoked = revoked  # the node ids the network's signed config revoked
        self.context = credentials.server_context()
        self.context.verify_mode = ssl.CERT_OPTIONAL  # this PC's own callers need none
        self._server = None
        self.port: int | None = None

    async def start(self, host: str, port: int = 0) -> None:
        self._server = await websockets.serve(
            self._no_websocket,
            host,
            port,
            ssl=self.context,
            process_request=self._answer,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _no_websocket(self, connection) -> None:
        await connection.close(1008, "this port serves /metrics only")

    def _answer(self, connection, request) -> Response:
        path = request.path.split("?", 1)[0]
        if path != PATH:
            return _text(http.HTTPStatus.NOT_FOUND, f"only {PATH} is served here\n")
        why = self._refusal(connection)
        if why is not None:
            return _text(http.HTTPStatus.FORBIDDEN, why + "\n")
        body, content_type = self.render(request.headers.get("Accept"), self.network_id)
        headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return Response(200, "OK", headers, body)

    def _refusal(self, connection) -> str | None:
        """Why this caller may not read (None: it may)."""
        ssl_object = connection.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            host = connection.remote_address[0] if connection.remote_address else None
            local = connection.local_address[0] if connection.local_address else None
            return None if is_local(host, local) else "present a certificate of the network"
        try:  # TLS verified it against this network's CA
            info = certificate_info(x509.load_der_x509_certificate(der))
        except (IdentityError, ValueError) as exc:
            return f"unreadable certificate: {exc}"
        if info.network_id != self.network_id or info.role not in METRICS_READERS:
            return f"a {info.role} certificate of {info.network_id} does not read these metrics"
        if info.node_id in self.revoked():
            return "this certificate was revoked"
        return None


def _text(status: http.HTTPStatus, text: str) -> Response:
    body = text.encode("utf-8")
    headers = Headers(
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return Response(status.value, status.phrase, headers, body)
