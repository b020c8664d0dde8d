"""Sessions across restarts and over time, with real node processes: the gateway's node
restarting between two turns loses nothing; sessions never leak on the nodes (answers,
cancelled and abandoned ones, errors, over /ws and the OpenAI API); idle sessions are freed on
the nodes and rebuilt on their next turn; a closed session can still be restored."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import websockets

from tests.helpers.cluster import (
    ask,
    request,
    session_counts,
    token_ids,
    wait_for_session_counts,
)
from tests.integration.test_chain import client_ws_url, reference_tokens

pytestmark = pytest.mark.integration
NET = "testnet"
PROMPT = [5, 17, 42, 99]
FOLLOW = [9, 10, 11]


def control(kind: str, sid: str) -> dict:
    return request(NET, message_type=kind, session_id=sid, message_id=f"{kind}-{sid}")


async def turn(url: str, sid: str, n: int = 6, **inputs) -> list[int]:
    """One complete greedy turn of session ``sid`` on a connection of its own."""
    async with websockets.connect(url) as ws:
        body = request(NET, temperature=0, max_tokens=n, session_id=sid, **inputs)
        replies = await ask(ws, body)
    assert replies[-1].get("status") == "success", replies[-1]
    return token_ids(replies)


async def session_control(url: str, kind: str, sid: str) -> dict:
    async with websockets.connect(url) as ws:
        return (await ask(ws, control(kind, sid)))[0]


def gateway_sessions(cluster) -> dict:
    health = httpx.get(cluster.api_url.removesuffix("/v1") + "/health", timeout=60).json()
    return health["sessions"][NET]


def test_restarting_the_gateways_node_loses_no_conversation(own_tiny_cluster):
    """kill -9 the node that runs the gateway (and the chain's first span) between two turns:
    each conversation's second turn has its first turn's history, token for token as in an
    undisturbed run; a saved one comes back from its saved KV, the others by replay."""
    cluster, homes, _ = own_tiny_cluster

    async def first_turns(url):
        reference = {
            "ids": [
                await turn(url, "ref-ids", input_ids=PROMPT),
                await turn(url, "ref-ids", input_ids=FOLLOW),
            ],
            "chat": [
                await turn(url, "ref-chat", prompt="Hello there"),
                await turn(url, "ref-chat", prompt="And then?"),
            ],
        }
        alone = await turn(url, "alone", input_ids=FOLLOW)  # the second turn, no history
        first = {
            "ids": await turn(url, "ids", input_ids=PROMPT),
            "chat": await turn(url, "chat", prompt="Hello there"),
            "saved": await turn(url, "saved", input_ids=PROMPT),
        }
        saved = await session_control(url, "session_save", "saved")
        assert saved["detail"].startswith("saved"), saved
        abandoned = request(NET, session_id="abandoned", input_ids=PROMPT, max_tokens=400)
        await _abandon(url, abandoned, after=3)  # a first turn that never completed
        return reference, alone, first

    reference, alone, first = asyncio.run(first_turns(client_ws_url(cluster)))
    assert alone != reference["ids"][1]  # so the history matters to the second turn
    left_over = homes[0] / "cache" / "kv" / NET / "spilled-by-the-last-run.npz"
    left_over.write_bytes(b"stale")

    async def kill_mid_answer(url) -> list[int]:
        """The gateway's node is killed while it streams an answer without a session."""
        ws = await websockets.connect(url)
        await ws.send(json.dumps(request(NET, input_ids=PROMPT, max_tokens=400)))
        for _ in range(3):
            await asyncio.wait_for(ws.recv(), 120)
        held = await session_counts(homes, NET)
        await asyncio.to_thread(cluster.restart, 0, kill=True)
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            await ws.close()
        return held

    held = asyncio.run(kill_mid_answer(client_ws_url(cluster)))
    assert held == [8, 8, 8]  # 6 conversations, the abandoned one, the answer in flight

    async def second_turns(url):
        # what the other nodes held for the gateway before the restart is freed there
        freed = await wait_for_session_counts(homes, NET, 0)
        second, replays = {}, {}
        for sid, inputs in (
            ("ids", {"input_ids": FOLLOW}),
            ("chat", {"prompt": "And then?"}),
            ("saved", {"input_ids": FOLLOW}),
        ):
            second[sid] = await turn(url, sid, **inputs)
            replays[sid] = (await asyncio.to_thread(gateway_sessions, cluster))["replays"]
        return freed, second, replays

    freed, second, replays = asyncio.run(second_turns(client_ws_url(cluster)))
    assert freed == [0, 0, 0]
    assert not left_over.exists()
    assert [first["ids"], second["ids"]] == reference["ids"]
    assert [first["chat"], second["chat"]] == reference["chat"]
    assert [first["saved"], second["saved"]] == reference["ids"]
    assert gateway_sessions(cluster)["resumed"] == 3
    assert replays["ids"] == 1  # rebuilt by replaying its history
    assert replays["saved"] == replays["chat"], replays  # from its saved KV, no replay
    assert asyncio.run(session_counts(homes, NET)) == [3, 3, 3]


async def _abandon(url: str, body: dict, after: int) -> None:
    """Send a request and drop the connection once ``after`` replies came."""
    ws = await websockets.connect(url)
    await ws.send(json.dumps(body))
    for _ in range(after):
        await asyncio.wait_for(ws.recv(), 120)
    await ws.close()


async def _cancelled(url: str, sid: str | None) -> dict:
    """A long answer cancelled from a second connection after its first token."""
    async with websockets.connect(url) as ws, websockets.connect(url) as other:
        body = request(NET, input_ids=PROMPT, temperature=0, max_tokens=400, message_id="long")
        if sid is not None:
            body["session_id"] = sid
        await ws.send(json.dumps(body))
        first = json.loads(await asyncio.wait_for(ws.recv(), 120))
        await ask(other, control("cancel", first["session_id"]))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if reply.get("status") != "processing":
                return reply


def test_sessions_do_not_leak_on_the_nodes(own_tiny_cluster):
    """Many answers of every kind, then the kept sessions closed: every node holds what it
    held before. A named answer abandoned mid-way leaves its conversation as it was."""
    cluster, homes, _ = own_tiny_cluster
    url = client_ws_url(cluster)
    api = cluster.api_url

    async def load() -> dict:
        baseline = await session_counts(homes, NET)
        async with websockets.connect(url) as ws:  # answers in sessions of their own
            for i in range(5):
                body = request(NET, input_ids=[*PROMPT, i], temperature=0, max_tokens=5)
                assert (await ask(ws, body))[-1]["status"] == "success"
            for i in range(3):  # a token beyond the vocabulary: an error from the chain
                for sid in (None, f"bad-{i}"):
                    body = request(NET, input_ids=[5, 10**6], max_tokens=5, session_id=sid)
                    error = (await ask(ws, body))[-1]
                    assert error["header"]["message_type"] == "error", error
        for i in range(3):  # kept and closed
            await turn(url, f"named-{i}", input_ids=PROMPT)
            assert (await session_control(url, "session_close", f"named-{i}"))["detail"] == "closed"
        cancelled = [await _cancelled(url, None), await _cancelled(url, "cancelled")]
        for _ in range(3):  # the client goes away mid-answer
            body = request(NET, input_ids=PROMPT, temperature=0, max_tokens=400)
            await _abandon(url, body, after=3)
        reference = [
            await turn(url, "ref", input_ids=PROMPT),
            await turn(url, "ref", input_ids=FOLLOW),
        ]
        dropped = [await turn(url, "dropped", input_ids=PROMPT)]
        body = request(NET, session_id="dropped", input_ids=[7, 7], temperature=0, max_tokens=400)
        await _abandon(url, body, after=3)
        dropped.append(await turn(url, "dropped", input_ids=FOLLOW))
        async with httpx.AsyncClient(timeout=120) as client:
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            for stream in (False, True):
                body = {**chat, "stream": stream}
                reply = await client.post(f"{api}/chat/completions", json=body)
                assert reply.status_code == 200
            for _ in range(3):  # the API client goes away after the first chunk
                long = {**chat, "max_tokens": 400, "stream": True}
                async with client.stream("POST", f"{api}/chat/completions", json=long) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data:"):
                            break
        for sid in ("ref", "dropped", *(f"bad-{i}" for i in range(3)), "cancelled"):
            await session_control(url, "session_close", sid)
        after = await wait_for_session_counts(homes, NET, baseline)
        return {
            "baseline": baseline,
            "after": after,
            "cancelled": cancelled,
            "reference": reference,
            "dropped": dropped,
        }

    seen = asyncio.run(load())
    assert seen["after"] == seen["baseline"] == [0, 0, 0]
    assert [c["finish_reason"] for c in seen["cancelled"]] == ["cancelled", "cancelled"]
    assert seen["dropped"] == seen["reference"]  # the abandoned turn left no trace
    assert gateway_sessions(cluster)["open"] == 0


@pytest.fixture
def quick_idle_cluster(tiny_llama, tmp_path):
    """A cluster whose gateway frees sessions unused for about two seconds."""
    from tests.conftest import _tiny_cluster

    options = {"gateway_args": ["--session-idle-minutes", "0.03"]}
    yield from _tiny_cluster(tiny_llama, tmp_path / "cluster", **options)


def test_idle_sessions_are_freed_on_the_nodes_and_rebuilt_on_their_next_turn(
    quick_idle_cluster, tiny_llama
):
    cluster, homes, _ = quick_idle_cluster
    url = client_ws_url(cluster)

    async def go():
        first = await turn(url, "idle", input_ids=PROMPT)
        freed = await wait_for_session_counts(homes, NET, 0)
        second = await turn(url, "idle", input_ids=FOLLOW)
        return first, freed, second

    first, freed, second = asyncio.run(go())
    assert freed == [0, 0, 0]
    # the second turn continues the whole conversation (its last answer token was not fed)
    assert second == reference_tokens(tiny_llama, PROMPT + first + FOLLOW, 6)
    assert gateway_sessions(cluster)["replays"] >= 1


def test_a_closed_session_can_be_restored_from_its_save(tiny_cluster, tiny_llama):
    cluster, _, _ = tiny_cluster
    url = client_ws_url(cluster)
    sid = "closed-then-restored"

    async def go():
        first = await turn(url, sid, input_ids=PROMPT)
        saved = await session_control(url, "session_save", sid)
        more = await turn(url, sid, input_ids=[3, 4])  # after the save: not in it
        closed = await session_control(url, "session_close", sid)
        replays = (await asyncio.to_thread(gateway_sessions, cluster))["replays"]
        restored = await session_control(url, "session_restore", sid)
        second = await turn(url, sid, input_ids=FOLLOW)
        after = (await asyncio.to_thread(gateway_sessions, cluster))["replays"]
        await session_control(url, "session_close", sid)
        return first, saved, more, closed, restored, second, after - replays

    first, saved, more, closed, restored, second, replayed = asyncio.run(go())
    assert saved["detail"].startswith("saved") and closed["detail"] == "closed"
    assert restored["detail"] == "restored", restored
    assert more and second == reference_tokens(tiny_llama, PROMPT + first + FOLLOW, 6)
    assert replayed == 0  # from the saved KV, not by replay


def test_an_edited_or_regenerated_turn_recomputes_only_what_changed(tiny_cluster, tmp_path):
    """Regenerate and edit-and-resend rewind the conversation on every node to the part that
    did not change (``session_truncate``: KV caches and the head's token history), so only
    the rest runs again; the answer is the one a fresh conversation gets, also with a
    repetition penalty (which reads the head's history)."""
    from tiktrue.database import Database
    from tiktrue.gateway.api_client import Gateway
    from tiktrue.gateway.session_store import SessionStore
    from tiktrue.model.generation import GenerationResult
    from tiktrue.model.sampling import SamplingParams
    from tiktrue.security.node_tls import NetworkCredentials

    _, homes, config = tiny_cluster
    params = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3)
    hello = {"role": "user", "content": "Hello there"}
    question = {"role": "user", "content": "What is the capital of France?"}
    edited = {"role": "user", "content": "What is the capital of Spain?"}

    async def go():
        gateway = Gateway(
            homes[0],
            config,
            NetworkCredentials.load(homes[0], NET),
            session_store=SessionStore(Database(tmp_path / "sessions.db")),
        )

        async def say(sid: str, messages: list[dict]) -> GenerationResult:
            result = GenerationResult()
            async for _ in gateway.answer(params, messages=messages, session_id=sid, result=result):
                pass
            return result

        try:
            first = await say("talk", [hello])
            asked = [hello, {"role": "assistant", "content": first.text}, question]
            second = await say("talk", asked)
            regenerated = await say("talk", asked)
            after_edit = await say("talk", [*asked[:2], edited])
            fresh = await say("fresh", [*asked[:2], edited])
            return second, regenerated, after_edit, fresh
        finally:
            for sid in ("talk", "fresh"):
                await gateway.sessions.close(sid)
            await gateway.aclose()

    second, regenerated, after_edit, fresh = asyncio.run(go())
    assert regenerated.token_ids == second.token_ids
    assert regenerated.prompt_tokens == 1  # only the question's last token ran again
    assert after_edit.token_ids == fresh.token_ids
    assert 1 < after_edit.prompt_tokens < fresh.prompt_tokens - 5, (after_edit, fresh)
