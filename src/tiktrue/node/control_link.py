"""The client side of a node's control channel (join, node info, config and block pushes).

One request at a time on one TLS 1.3 WebSocket. The server is pinned: the key it proves in the
handshake must hash to the node id the caller expects.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import websockets

from tiktrue.node.peer_link import CLOSE_TIMEOUT, HARD_FRAME_LIMIT, PeerUnavailable
from tiktrue.security.auth_manager import IdentityError
from tiktrue.security.node_tls import NetworkCredentials, control_client_context, peer_node_id

TIMEOUT = 30.0


class ControlError(Exception):
    """The other node refused a control request; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlLink:
    def __init__(
        self,
        address: str,
        *,
        expected_node_id: str | None,
        credentials: NetworkCredentials | None = None,
    ) -> None:
        self.address = address
        self.expected_node_id = expected_node_id
        self.credentials = credentials
        self.node_id: str | None = None
        self._ws = None

    @classmethod
    def to(cls, node, credentials: NetworkCredentials) -> ControlLink:
        """A link to ``node`` (a config entry), pinned by its id, presenting ``credentials``."""
        if node.control_address is None:
            raise PeerUnavailable(f"node {node.node_id} has no control port in the config")
        return cls(node.control_address, expected_node_id=node.node_id, credentials=credentials)

    async def __aenter__(self) -> ControlLink:
        try:
            self._ws = await asyncio.wait_for(
                websockets.connect(
                    f"wss://{self.address}",
                    ssl=control_client_context(self.credentials),
                    max_size=HARD_FRAME_LIMIT,
                    compression=None,
                    close_timeout=CLOSE_TIMEOUT,
                ),
                TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
            raise PeerUnavailable(f"cannot reach the node at {self.address}: {exc}") from exc
        self.node_id = peer_node_id(self._ws.transport.get_extra_info("ssl_object"))
        if self.expected_node_id and self.node_id != self.expected_node_id:
            await self._ws.close()
            raise IdentityError(
                f"{self.address} is node {self.node_id}, not {self.expected_node_id} as expected"
            )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._ws is not None:
            await self._ws.close()

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake (the peer may be hung)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.transport.abort()

    async def call(self, op: str, payload: bytes | None = None, **fields: Any) -> dict:
        """Send one request (JSON, or a binary frame when ``payload`` is given); await its reply."""
        request_id = uuid.uuid4().hex
        if payload is None:
            message = json.dumps({"op": op, "id": request_id, **fields})
        else:
            from tiktrue.protocol.frames import encode_bytes_frame

            message = encode_bytes_frame(payload, op=op, id=request_id, **fields)
        try:
            await self._ws.send(message)
        except websockets.ConnectionClosed as exc:
            raise PeerUnavailable(f"{self.address} closed the connection before {op}") from exc
        try:
            reply = json.loads(await asyncio.wait_for(self._ws.recv(), TIMEOUT * 4))
        except (websockets.ConnectionClosed, asyncio.TimeoutError) as exc:
            raise PeerUnavailable(f"{self.address} did not answer {op}: {exc}") from exc
        if not reply.get("ok"):
            raise ControlError(reply.get("code", "error"), reply.get("message", ""))
        return reply
