"""Talking to a running local cluster from tests: raw node connections and the client /ws."""

from __future__ import annotations

import asyncio
import json
import time

import websockets

from tiktrue.protocol import protocol_spec as ps


async def node_connection(address: str, credentials, hello: ps.Hello):
    """A raw mutual-TLS connection to a block server, after a successful hello and challenge
    (``credentials``: a ``NetworkCredentials``)."""
    from tiktrue.node import handshake

    ws = await websockets.connect(
        f"wss://{address}", ssl=credentials.client_context(), max_size=64 << 20
    )
    reply = await handshake.offer(ws, hello, credentials)
    assert reply["header"]["message_type"] == "hello_reply", reply
    return ws


async def ask(ws, message: dict | str) -> list[dict]:
    """Send one client request; collect replies until a final one (success, error or ack)."""
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    replies = []
    while True:
        reply = json.loads(await ws.recv())
        replies.append(reply)
        kind = reply["header"]["message_type"]
        if kind != "inference_response" or reply["status"] != "processing":
            return replies


def token_ids(replies: list[dict]) -> list[int]:
    return [r["token_id"] for r in replies if r.get("status") == "processing" and "token_id" in r]


def request(network_id: str, **body) -> dict:
    return {
        "header": {
            "message_id": body.pop("message_id", "m-1"),
            "message_type": body.pop("message_type", "inference_request"),
            "protocol_version": "2.0",
        },
        "network_id": network_id,
        **body,
    }


async def direct_answer_usage(ws_url: str, network_id: str, prompt: list[int]) -> dict:
    """The usage of a short greedy answer once the chain's head answers its first node
    directly: the head connects to the first node when both are up (retried every 2 s)."""
    import websockets

    deadline = time.monotonic() + 120  # a ceiling for a busy machine
    async with websockets.connect(ws_url) as client:
        while True:
            body = request(network_id, input_ids=prompt, temperature=0, max_tokens=8)
            usage = (await ask(client, body))[-1]["usage"]
            if usage["link_rtt_ms"][-1] is not None or time.monotonic() > deadline:
                return usage
            await asyncio.sleep(0.2)


async def network_infos(homes, network_id: str) -> list[dict]:
    """Each node's ``node_info`` entry of ``network_id`` (over the control port)."""
    from tiktrue.node.control_link import ControlLink
    from tiktrue.paths import run_file
    from tiktrue.security.node_tls import NetworkCredentials

    infos = []
    for home in homes:
        control = json.loads(run_file(home).read_text())["control"]
        credentials = NetworkCredentials.load(home, network_id)
        async with ControlLink(control, expected_node_id=None, credentials=credentials) as link:
            info = await link.call("node_info")
        infos.append(info["networks"][network_id])
    return infos


async def session_counts(homes, network_id: str) -> list[int]:
    """How many sessions each node's KV cache holds."""
    return [info["sessions"] for info in await network_infos(homes, network_id)]


async def wait_for_session_counts(homes, network_id: str, expected, timeout: float = 120.0):
    """Poll until every node holds ``expected`` sessions (an int for all, or one per node);
    returns the last counts (the caller asserts them: they differ when the ceiling passed)."""
    want = [expected] * len(homes) if isinstance(expected, int) else list(expected)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        counts = await session_counts(homes, network_id)
        if counts == want or asyncio.get_running_loop().time() > deadline:
            return counts
        await asyncio.sleep(0.2)


def api_key(home, name: str = "tests") -> str:
    """A fresh API key of the plain account ``name`` on the node at ``home`` (made once).
    Its own account, never "the first one": which account a node's first is (its admin)
    depends on which test module ran first on a shared cluster."""
    from tiktrue.security.users import UserStore

    users = UserStore(home, rounds=4)
    if name not in {u.name for u in users.list_users()}:
        users.add_user(name, "a long password", "user")
    return users.create_key(name, name=name)[1]


def openai_client(cluster, home):
    """The official OpenAI client on a cluster's gateway, with a key of its node's account."""
    from openai import OpenAI

    return OpenAI(base_url=cluster.api_url, api_key=api_key(home, "openai tests"), max_retries=0)


def client_ws_url(cluster) -> str:
    """The gateway's client WebSocket ``/ws`` of a running cluster."""
    return cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
