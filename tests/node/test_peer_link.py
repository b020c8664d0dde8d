"""PeerLink over a real mutual-TLS WebSocket on 127.0.0.1: replies found by message id (also
when they arrive another way), lost connections, one-way sends, ping round trips."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tiktrue.control import network_manager as nm
from tiktrue.node import handshake
from tiktrue.node.peer_link import PeerLink, PeerUnavailable
from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.node_tls import NetworkCredentials

NET = "net-p"


@pytest.fixture(scope="module")
def credentials(tiny_llama, tmp_path_factory) -> NetworkCredentials:
    home = tmp_path_factory.mktemp("peer-link")
    nm.create_network(home, "P", tiny_llama, network_id=NET)
    return NetworkCredentials.load(home, NET)


class Peer:
    """A block-server stand-in: answers hello and the challenge, then does what the test
    tells it."""

    def __init__(self, credentials: NetworkCredentials) -> None:
        self.credentials = credentials
        self.received: list = []
        self.connections: list = []
        self.server = None

    async def start(self) -> int:
        self.server = await websockets.serve(
            self._handle, "127.0.0.1", 0, ssl=self.credentials.server_context()
        )
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, ws) -> None:
        hello = ps.parse_message(await ws.recv()).message
        await handshake.accept(ws, hello, self.credentials)
        self.connections.append(ws)
        async for raw in ws:
            self.received.append(raw)

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def until(condition) -> None:
    """Wait (polling the loop) until ``condition()`` holds; callers put a ceiling on it."""
    while not condition():
        await asyncio.sleep(0.01)


def answer(message_id: str, token: int) -> str:
    header = {"message_type": "inference_response"}
    return json.dumps({"header": header, "in_reply_to": message_id, "token_id": token})


def test_replies_find_their_request_however_they_come(credentials):
    async def go():
        peer = Peer(credentials)
        port = await peer.start()
        lost = []
        link = PeerLink(
            "127.0.0.1",
            port,
            network_id=NET,
            credentials=credentials,
            on_lost=lost.append,
        )
        first = asyncio.create_task(link.request(b"step-a", "a", timeout=60))
        second = asyncio.create_task(link.request(b"step-b", "b", timeout=60))
        await asyncio.wait_for(until(lambda: len(peer.received) == 2), 60)
        assert link.latency_ms is not None and link.latency_ms > 0  # pinged on connect
        await peer.connections[0].send(answer("b", 2))  # out of order, on the link
        assert (await second)["token_id"] == 2
        assert link.resolve(json.loads(answer("a", 1)))  # from elsewhere (the head)
        assert (await first)["token_id"] == 1
        assert not link.resolve(json.loads(answer("a", 1)))  # nobody waits for it any more

        waiting = asyncio.create_task(link.request(b"step-c", "c", timeout=60))
        await asyncio.wait_for(until(lambda: link.waiting == 1 and len(peer.received) == 3), 60)
        await peer.connections[0].close()  # the peer drops the connection
        with pytest.raises(PeerUnavailable):
            await waiting
        assert lost == [link]

        await link.send("one-way")  # reconnects on use
        await asyncio.wait_for(until(lambda: len(peer.received) == 4), 60)
        assert peer.received[-1] == "one-way" and len(peer.connections) == 2

        await peer.stop()  # the peer is gone: a step is not resent, and says so
        await asyncio.wait_for(until(lambda: len(lost) == 2), 60)  # the drop is noticed
        with pytest.raises(PeerUnavailable):
            await link.send(b"step-d", resend=False)
        await link.close()
        assert lost == [link, link]  # the second drop was reported too, close() is not

    asyncio.run(go())
