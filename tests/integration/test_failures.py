"""A node dying mid-answer: the client gets a clear error, never a stream that hangs, and the
tokens it already got are right. (The head answers the first node directly, so a lost node
must be reported to the first node: by its own link, the link_lost notice, or the dropped
connection of the head.)"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import pytest
import websockets

from tests.helpers.cluster import direct_answer_usage, request, token_ids
from tests.integration.test_chain import client_ws_url, reference_tokens

pytestmark = pytest.mark.integration
PROMPT = [5, 17, 42, 99]


async def answer_while_killing(cluster, victim: int, after: int = 10) -> list[dict]:
    """Stream a long greedy answer; once ``after`` tokens arrived, freeze node ``victim`` (so
    a step is surely in its hands), then kill it."""
    usage = await direct_answer_usage(client_ws_url(cluster), "testnet", PROMPT)
    assert usage["link_rtt_ms"][-1] is not None  # the head answers node1 directly
    replies = []
    async with websockets.connect(client_ws_url(cluster)) as ws:
        body = request("testnet", input_ids=PROMPT, temperature=0, max_tokens=480)
        await ws.send(json.dumps(body))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
            replies.append(reply)
            if len(replies) == after:
                cluster.processes[victim].send_signal(signal.SIGSTOP)
                await asyncio.sleep(1.0)
                cluster.processes[victim].kill()
            if reply["header"]["message_type"] != "inference_response":
                return replies
            if reply["status"] != "processing":
                return replies


@pytest.mark.skipif(sys.platform == "win32", reason="freezes a process with SIGSTOP")
@pytest.mark.parametrize("victim", [1, 2], ids=["middle node", "head"])
def test_a_node_killed_mid_answer_ends_the_stream_with_a_clear_error(
    own_tiny_cluster, tiny_llama, victim
):
    cluster, _, _ = own_tiny_cluster
    replies = asyncio.run(answer_while_killing(cluster, victim))
    last = replies[-1]
    assert last["header"]["message_type"] == "error", last
    assert last["code"] == "peer_unavailable", last
    got = token_ids(replies)
    assert len(got) >= 10
    assert got == reference_tokens(tiny_llama, PROMPT, len(got))  # nothing wrong came before
