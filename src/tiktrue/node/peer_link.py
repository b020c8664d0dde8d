"""``PeerLink``: one persistent mutual-TLS WebSocket to a block server of a network.

Used by a node to reach the next node of its chain, and by the gateway to reach the first.
The link says hello (node id, network, versions), and both ends answer each other's challenge
bound to this TLS session (``node.handshake``, once per connection); then it multiplexes
requests: each request carries a message_id, the reader task hands each reply to the request
that waits for it, so many sessions share one connection. A reply may also come back by
another way (the chain's head answers its first node directly): ``resolve`` hands it to the
waiting request. ``send`` is for one-way messages that expect no reply on this link.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Collection
from typing import Any

import websockets

from tiktrue import limits
from tiktrue.node import handshake
from tiktrue.protocol.protocol_spec import Hello, Message, make_message
from tiktrue.security.node_tls import NetworkCredentials

HARD_FRAME_LIMIT = 256 << 20  # websockets' own limit; ours is lower and answered politely
CONNECT_TIMEOUT = 10.0
# A closing handshake waits this long for the peer's close frame (websockets' default: 10 s).
# Every node-to-node WebSocket uses it: a hung peer (frozen, asleep, its network gone) must not
# hold up a node that stops, nor a link that is replaced, for more than this.
CLOSE_TIMEOUT = 1.0


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
        credentials: NetworkCredentials,
        role: str | None = None,
        hello: Hello | None = None,
        on_lost: Callable[[PeerLink], None] | None = None,
        expected_node_id: str | None = None,
        revoked: Collection[str] = (),
    ) -> None:
        self.host, self.port = host, port
        self.network_id = network_id
        self.credentials = credentials
        self.node_id = credentials.identity.node_id
        self.ssl_context = credentials.client_context()
        self.expected_node_id = expected_node_id  # the server must be this node
        self.revoked = revoked  # node ids removed from the network: never trusted
        self.hello = hello or Hello(node_id=self.node_id, network_id=network_id, role=role)
        self.peer: dict[str, Any] = {}
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._connecting = asyncio.Lock()
        self._on_lost = on_lost  # called when an open connection drops (not on close())
        self._closing = False
        self._latency: float | None = None

    @property
    def connected(self) -> bool:
        return self._ws is not None

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
                        ping_interval=limits.LINK_PING_INTERVAL_S,
                        ping_timeout=limits.LINK_PING_TIMEOUT_S,
                        close_timeout=CLOSE_TIMEOUT,
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                raise PeerUnavailable(f"cannot reach {self.address}: {exc}") from exc
            try:
                reply = await handshake.offer(
                    ws,
                    self.hello,
                    self.credentials,
                    expected_node_id=self.expected_node_id,
                    revoked=self.revoked,
                )
            except (websockets.ConnectionClosed, asyncio.TimeoutError) as exc:
                raise PeerUnavailable(f"{self.address} closed the connection at hello") from exc
            except BaseException:
                await ws.close()
                raise
            self.peer = reply
            self._ws = ws
            self._reader = asyncio.create_task(self._read(ws))
            await self._ping()

    async def _ping(self) -> float | None:
        """Ping the peer; the round trip in ms (also kept in ``latency_ms``)."""
        ws = self._ws
        if ws is None:
            return None
        try:
            pong = await ws.ping()
            await asyncio.wait_for(pong, CONNECT_TIMEOUT)
        except (websockets.ConnectionClosed, asyncio.TimeoutError):
            return None
        self._latency = ws.latency
        return self.latency_ms

    @property
    def latency_ms(self) -> float | None:
        """Round trip of the last WebSocket ping (on connect, then every keepalive), in ms."""
        ws = self._ws
        if ws is not None and ws.latency > 0:
            self._latency = ws.latency
        return None if self._latency is None else round(self._latency * 1000, 3)

    async def _read(self, ws) -> None:
        try:
            async for raw in ws:
                try:
                    reply = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(reply, dict):
                    self.resolve(reply)
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            if self._ws is None:  # not already replaced by a new connection
                self.fail_pending(PeerUnavailable(f"connection to {self.address} was lost"))
                if self._on_lost is not None and not self._closing:
                    self._on_lost(self)

    def resolve(self, reply: dict) -> bool:
        """Hand ``reply`` to the request waiting for its ``in_reply_to``; False if none."""
        future = self._pending.pop(str(reply.get("in_reply_to")), None)
        if future is None or future.done():
            return False
        future.set_result(reply)
        return True

    def fail_pending(self, error: Exception) -> None:
        """Every request still waiting gets ``error``."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def request(
        self, payload: bytes | str | Message, message_id: str, *, timeout: float
    ) -> dict:
        """Send one frame or message and wait for the reply naming ``message_id``; a peer
        that gives none within ``timeout`` seconds is unavailable (every round trip has a
        deadline: a hung node must not hold its caller for ever)."""
        if self._ws is None:
            await self.connect()
        if isinstance(payload, Message):
            payload = make_message(payload)
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await self._ws.send(payload)
            return await asyncio.wait_for(future, timeout)
        except (websockets.ConnectionClosed, AttributeError) as exc:
            raise PeerUnavailable(f"connection to {self.address} was lost") from exc
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"{self.address} gave no answer in {timeout:.0f} s") from None
        finally:
            self._pending.pop(message_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed while the send was still out: raised above instead

    async def send(self, payload: bytes | str | Message, *, resend: bool = True) -> None:
        """Send one message that expects no reply on this link (connecting first if needed).

        When the connection turns out to be dead, ``resend`` reconnects and sends again once;
        a forward step must not be resent (the first node may already be replaying it)."""
        if isinstance(payload, Message):
            payload = make_message(payload)
        for attempt in range(2 if resend else 1):
            if self._ws is None:
                await self.connect()
            try:
                await self._ws.send(payload)
                return
            except (websockets.ConnectionClosed, AttributeError) as exc:
                self._ws = None
                if attempt or not resend:
                    raise PeerUnavailable(f"connection to {self.address} was lost") from exc

    async def close(self) -> None:
        """Close the link; requests still waiting fail at once (a hung peer would otherwise
        hold them through the whole close handshake)."""
        self._closing = True
        self.fail_pending(PeerUnavailable(f"the link to {self.address} was closed"))
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def new_message_id() -> str:
    return uuid.uuid4().hex
