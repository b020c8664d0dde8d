"""``PeerLink``: one persistent mutual-TLS WebSocket to a block server of a network.

Used by a node to reach the next node of its chain, and by the gateway to reach the first.
The link says hello (node id, network, versions) and then multiplexes requests: each request
carries a message_id, the reader task hands each reply to the request that waits for it, so
many sessions share one connection.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from typing import Any

import websockets

from tiktrue.protocol.protocol_spec import (
    Hello,
    Message,
    ProtocolError,
    make_message,
)

HARD_FRAME_LIMIT = 256 << 20  # websockets' own limit; ours is lower and answered politely
CONNECT_TIMEOUT = 10.0


class PeerUnavailable(ConnectionError):
    """The peer cannot be reached or the connection dropped with requests in flight."""

    code = "peer_unavailable"


class PeerLink:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        network_id: str,
        node_id: str,
        ssl_context: ssl.SSLContext,
        role: str | None = None,
        hello: Hello | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.network_id = network_id
        self.node_id = node_id
        self.ssl_context = ssl_context
        self.hello = hello or Hello(node_id=node_id, network_id=network_id, role=role)
        self.peer: dict[str, Any] = {}
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._connecting = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self) -> None:
        async with self._connecting:
            if self._ws is not None:
                return
            try:
                ws = await asyncio.wait_for(
                    websockets.connect(
                        f"wss://{self.host}:{self.port}",
                        ssl=self.ssl_context,
                        max_size=HARD_FRAME_LIMIT,
                        compression=None,
                        ping_interval=20,
                        ping_timeout=20,
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                raise PeerUnavailable(f"cannot reach {self.address}: {exc}") from exc
            await ws.send(make_message(self.hello))
            try:
                reply = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT))
            except (websockets.ConnectionClosed, asyncio.TimeoutError) as exc:
                raise PeerUnavailable(f"{self.address} closed the connection at hello") from exc
            if reply.get("header", {}).get("message_type") == "error":
                await ws.close()
                raise ProtocolError(reply.get("code", "error"), reply.get("message", ""))
            self.peer = reply
            self._ws = ws
            self._reader = asyncio.create_task(self._read(ws))

    async def _read(self, ws) -> None:
        try:
            async for raw in ws:
                try:
                    reply = json.loads(raw)
                except ValueError:
                    continue
                future = self._pending.pop(str(reply.get("in_reply_to")), None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._ws = None
            error = PeerUnavailable(f"connection to {self.address} was lost")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    async def request(self, payload: bytes | str | Message, message_id: str) -> dict:
        """Send one frame or message and wait for the reply naming ``message_id``."""
        if self._ws is None:
            await self.connect()
        if isinstance(payload, Message):
            payload = make_message(payload)
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await self._ws.send(payload)
        except (websockets.ConnectionClosed, AttributeError) as exc:
            self._pending.pop(message_id, None)
            raise PeerUnavailable(f"connection to {self.address} was lost") from exc
        return await future

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def new_message_id() -> str:
    return uuid.uuid4().hex
