"""A node lost mid-answer costs a pause, never the answer (issue 8): real node processes on
127.0.0.1, a node killed (SIGKILL) or frozen (SIGSTOP) while a greedy answer streams; the
answer completes token-identical to an undisturbed run.

- with a backup holding a replica of the lost span: it takes over at once;
- without one, with room elsewhere: the admin redistributes the blocks;
- without room: the network is degraded; requests queue (``queued`` on /ws, 503 with
  Retry-After on the OpenAI API) and complete when the node returns.

An idle backup with a replica of a run of spans is a second chain for new conversations
while the chain is busy; a failover takes it back into the chain.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import httpx
import pytest
import torch
import websockets

from tests.helpers.cluster import (
    node_connection,
    request,
    token_ids,
    wait_for_session_counts,
)
from tests.integration.test_chain import (
    client_ws_url,
    hello,
    member_credentials,
    reference_tokens,
)
from tiktrue.control.planner import DEFAULT_RUNTIME_BYTES, ModelProfile
from tiktrue.limits import MIN_AUTO_CONTEXT_TOKENS
from tiktrue.model.engine import Span
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.node.served_span import SLOW_STEP_ENV
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.protocol.network_config import config_path, read_config, write_config
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "testnet"
PROMPT = [5, 17, 42, 99]
ANSWER = 160  # tokens at most (the gateway stops earlier at the end-of-text token)
CEILING = 180  # seconds: a generous ceiling for a busy machine, never a timing claim


def _spans(order):
    return [
        Span.of(order, "embed", "layer_1"),
        Span.of(order, "layer_2", "layer_3"),
        Span.of(order, "layer_4", "head"),
    ]


def _cluster(
    store,
    base,
    *,
    backup: bool,
    caps: int | None = None,
    backup_caps=None,
    replica=None,
    node_env=None,
):
    order = store.manifest.model_chain_order
    backups = [Span.of(order, *(replica or ("layer_2", "head")))] if backup else []
    homes, config = prepare_local_network(
        base, store, spans=_spans(order), backups=backups, network_id=NET
    )
    if backup:  # the planner keeps a backup when it plans again
        config = config.model_copy(update={"backup_nodes": 1})
        for home in homes:
            write_config(home, config)
    if caps is not None:
        for i, home in enumerate(homes):
            cap = backup_caps if i == 3 and backup_caps else caps
            (home / "caps.json").write_text(json.dumps({"ram_bytes": cap}), "utf-8")
    cluster = LocalCluster(homes, kv_budget_mb=16, node_env=node_env)
    cluster.start()
    return cluster, homes, config


@pytest.fixture
def with_backup(tiny_llama, tmp_path):
    cluster, homes, config = _cluster(tiny_llama, tmp_path / "c", backup=True)
    try:
        yield cluster, homes, config
    finally:
        for process in cluster.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT) if sys.platform != "win32" else None
        cluster.stop()


@pytest.fixture
def without_backup(tiny_llama, tmp_path):
    cluster, homes, config = _cluster(tiny_llama, tmp_path / "c", backup=False)
    try:
        yield cluster, homes, config
    finally:
        cluster.stop()


def _caps_for_all_three(store, share: float = 0.45) -> int:
    """A RAM cap with which the model (and its KV budget) fits on three nodes, not on two;
    with ``share=0.9`` a node holds a replica of two spans."""
    profile = ModelProfile.from_manifest(store.manifest, store.config())
    context = min(MIN_AUTO_CONTEXT_TOKENS, profile.max_context)  # as make_plan reserves it
    need = profile.total_bytes + profile.kv_bytes(profile.chain_order, context)
    return DEFAULT_RUNTIME_BYTES + int(need * share)


@pytest.fixture
def tight_with_backup(tiny_llama, tmp_path):
    caps, large = _caps_for_all_three(tiny_llama), _caps_for_all_three(tiny_llama, 0.9)
    cluster, homes, config = _cluster(
        tiny_llama, tmp_path / "c", backup=True, caps=caps, backup_caps=large
    )
    try:
        yield cluster, homes, config
    finally:
        cluster.stop()


@pytest.fixture
def tight(tiny_llama, tmp_path):
    cluster, homes, config = _cluster(
        tiny_llama, tmp_path / "c", backup=False, caps=_caps_for_all_three(tiny_llama)
    )
    try:
        yield cluster, homes, config
    finally:
        cluster.stop()


async def _answer(cluster, hit, *, after: int = 10, extra=None) -> list[dict]:
    """Stream a greedy answer; once ``after`` tokens arrived, call ``hit()`` (kill or freeze
    a node), then collect every reply until the final one."""
    replies = []
    async with websockets.connect(client_ws_url(cluster), max_size=None) as ws:
        await ws.send(json.dumps(request(NET, input_ids=PROMPT, temperature=0, max_tokens=ANSWER)))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
            replies.append(reply)
            if len(token_ids(replies)) == after and hit is not None:
                hit()
                hit = None
                if extra is not None:
                    await extra()
            if reply["header"]["message_type"] != "inference_response":
                return replies
            if reply["status"] in ("success", "error"):
                return replies


def _config(home):
    return read_config(config_path(home, NET))


def _assert_complete(replies, undisturbed: list[int]):
    """The answer ended well, token-identical to the same request undisturbed."""
    last = replies[-1]
    assert last["header"]["message_type"] == "inference_response", last
    assert last["status"] == "success", last
    assert token_ids(replies) == undisturbed


def _undisturbed(cluster, store) -> list[int]:
    """The answer before anything happens (the gateway stops at the end-of-text token), equal
    to the one-process engine's; long enough that a node is lost in the middle of it."""
    replies = asyncio.run(_answer(cluster, None))
    tokens = token_ids(replies)
    assert tokens == reference_tokens(store, PROMPT, len(tokens))
    assert len(tokens) > 40, tokens
    return tokens


@pytest.mark.parametrize("victim", [1, 2], ids=["middle node", "head"])
def test_a_killed_node_is_replaced_by_its_backup_and_the_answer_completes(
    with_backup, tiny_llama, victim
):
    cluster, homes, config = with_backup
    backup_id = config.nodes[3].node_id
    undisturbed = _undisturbed(cluster, tiny_llama)
    replies = asyncio.run(_answer(cluster, lambda: cluster.kill(victim)))
    _assert_complete(replies, undisturbed)
    now = _config(homes[0])
    assert now.version > config.version
    chain = [n.node_id for n in now.chain()]
    assert chain == [config.nodes[0].node_id, backup_id]  # the backup took both spans over
    assert now.node(config.nodes[victim].node_id).role == "backup"


@pytest.mark.skipif(sys.platform == "win32", reason="freezes a process with SIGSTOP")
def test_a_hung_node_is_detected_and_replaced_like_a_dead_one(with_backup, tiny_llama):
    cluster, homes, config = with_backup
    frozen = cluster.processes[1]
    undisturbed = _undisturbed(cluster, tiny_llama)
    replies = asyncio.run(_answer(cluster, lambda: frozen.send_signal(signal.SIGSTOP)))
    _assert_complete(replies, undisturbed)
    assert config.nodes[1].node_id not in {n.node_id for n in _config(homes[0]).chain()}


def test_no_node_keeps_a_session_after_a_failover(with_backup, tiny_llama):
    """Three answers at once (each in a session of its own) while a worker freezes and the
    backup takes over; then the frozen PC comes back. Once the answers have ended, no node
    holds a session: not the new chain's nodes, not the PC that froze through the change (a
    chain that changes frees what its nodes held: every session is rebuilt by replay), not
    the old chain's head."""
    cluster, homes, config = with_backup
    frozen = cluster.processes[1]

    async def go():
        hit = _answer(cluster, lambda: frozen.send_signal(signal.SIGSTOP))
        return await asyncio.gather(hit, _answer(cluster, None), _answer(cluster, None))

    try:
        answers = asyncio.run(go())
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert all(replies[-1].get("status") == "success" for replies in answers), answers
    assert config.nodes[1].node_id not in {n.node_id for n in _config(homes[0]).chain()}
    counts = asyncio.run(wait_for_session_counts(homes, NET, 0, timeout=CEILING))
    assert counts == [0, 0, 0, 0]


def test_without_a_backup_the_blocks_are_redistributed(without_backup, tiny_llama):
    cluster, homes, config = without_backup
    undisturbed = _undisturbed(cluster, tiny_llama)
    replies = asyncio.run(_answer(cluster, lambda: cluster.kill(1)))
    _assert_complete(replies, undisturbed)
    now = _config(homes[0])
    serving = {n.node_id for n in now.chain()}
    assert config.nodes[1].node_id not in serving
    assert serving <= {config.nodes[0].node_id, config.nodes[2].node_id}


def test_with_too_little_capacity_requests_queue_until_the_node_returns(tight, tiny_llama):
    cluster, homes, config = tight
    seen: dict = {}

    async def while_degraded():
        # wait until the gateway knows the chain is broken (a new request is then queued)
        api = cluster.api_url
        health = cluster.api_url.removesuffix("/v1") + "/health"
        async with httpx.AsyncClient(timeout=CEILING) as client:
            deadline = time.monotonic() + CEILING
            while (await client.get(health)).json()["healthy"][NET]:
                assert time.monotonic() < deadline, "the gateway never saw the lost node"
                await asyncio.sleep(0.1)
            seen["http"] = await client.post(
                f"{api}/completions",
                json={"model": "", "prompt": "hi", "max_tokens": 2, "temperature": 0},
            )
        async with websockets.connect(client_ws_url(cluster)) as ws:
            await ws.send(json.dumps(request(NET, input_ids=PROMPT, temperature=0, max_tokens=4)))
            seen["ws_first"] = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
        cluster.restart(1)  # the PC comes back: the chain heals, the answers go on

    undisturbed = _undisturbed(cluster, tiny_llama)
    replies = asyncio.run(_answer(cluster, lambda: cluster.kill(1), extra=while_degraded))
    _assert_complete(replies, undisturbed)
    http = seen["http"]
    assert http.status_code == 503 and int(http.headers["retry-after"]) > 0
    assert "healing" in http.json()["error"]["message"]
    assert seen["ws_first"]["status"] == "queued", seen["ws_first"]
    events = [e["event"] for e in recent_events(events_path(homes[0]), 1000, NET)]
    assert "network_degraded" in events, events  # nothing fitted without it
    # back: planned again with it (and with three nodes, as the caps need)
    assert config.nodes[1].node_id in {n.node_id for n in _config(homes[0]).chain()}


def test_a_lost_node_that_returns_is_planned_back_in(tight_with_backup, tiny_llama):
    """After the backup took over, the lost PC comes back: the admin sees it, plans again
    (three PCs in the chain, the large one a backup of two spans) and answers stay right."""
    cluster, homes, config = tight_with_backup
    undisturbed = _undisturbed(cluster, tiny_llama)
    _assert_complete(asyncio.run(_answer(cluster, lambda: cluster.kill(1))), undisturbed)
    failed_over = _config(homes[0]).version
    cluster.restart(1)
    deadline = time.monotonic() + CEILING
    while _config(homes[0]).version == failed_over:  # the admin polls lost nodes
        assert time.monotonic() < deadline, "the returning node was never planned back in"
        time.sleep(0.2)
    now = _config(homes[0])
    assert len(now.chain()) == 3
    [backup] = now.backups()
    assert backup.node_id == config.nodes[3].node_id  # the large one
    assert config.nodes[1].node_id in {n.node_id for n in now.chain()}
    _assert_complete(asyncio.run(_answer(cluster, None)), undisturbed)


def test_a_node_outside_the_chain_restarting_disturbs_no_answer(with_backup, tiny_llama):
    """The backup (in no chain) is killed during an answer and started again: the answer
    goes on undisturbed and the chain is not changed."""
    cluster, homes, config = with_backup
    undisturbed = _undisturbed(cluster, tiny_llama)
    replies = asyncio.run(_answer(cluster, lambda: cluster.restart(3, kill=True)))
    _assert_complete(replies, undisturbed)
    now = _config(homes[0])
    assert [n.node_id for n in now.chain()] == [n.node_id for n in config.chain()]
    assert now.version == config.version


def test_a_step_sent_to_a_backup_gets_a_recoverable_error(tiny_llama, tmp_path):
    """A node that holds no next node in its config (a backup of a middle span; or a node
    between two configs) answers a forward step with ``peer_unavailable``, which the gateway
    recovers from by replaying; it neither computes nor crashes, and the connection goes on."""
    cluster, homes, config = _cluster(
        tiny_llama, tmp_path / "c", backup=True, replica=("layer_2", "layer_3")
    )
    try:
        _send_two_steps(homes, config.nodes[3])
    finally:
        cluster.stop()


def _send_two_steps(homes, backup) -> None:
    credentials = member_credentials(homes)

    async def go():
        ws = await node_connection(backup.address, credentials, hello(credentials))
        hidden = torch.zeros(1, 2, 64)
        for message_id in ("a", "b"):
            frame = encode_tensor_frame(
                hidden,
                kind="forward",
                network_id=NET,
                session_id="s",
                message_id=message_id,
                start=0,
            )
            await ws.send(frame)
            reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
            assert reply["header"]["message_type"] == "error", reply
            assert (reply["code"], reply["in_reply_to"]) == ("peer_unavailable", message_id)
            assert "no next node" in reply["message"]
        await ws.close()

    asyncio.run(go())


@pytest.fixture
def replica_busy(tiny_llama, tmp_path):
    """``with_backup``, the first node slowed (each round 50 ms at least) so that two answers
    overlap long enough to watch them."""
    env = {0: {SLOW_STEP_ENV: "0.05"}}
    cluster, homes, config = _cluster(tiny_llama, tmp_path / "c", backup=True, node_env=env)
    try:
        yield cluster, homes, config
    finally:
        cluster.stop()


def test_a_busy_chain_sends_a_new_conversation_to_the_replica_until_a_failover_needs_it(
    replica_busy, tiny_llama
):
    """While one answer streams on the chain, a second conversation runs on the backup's
    replica (the first node, then the backup: the backup holds its session, the chain's
    other nodes do not); a worker then dies, the backup takes its span over (it steps back
    from the replica chain), and both answers complete, token-identical to an undisturbed
    run: the replica's session is replayed on the new chain."""
    cluster, homes, config = replica_busy
    undisturbed = _undisturbed(cluster, tiny_llama)
    on_replica = asyncio.Event()

    async def second() -> list[dict]:
        replies = []
        async with websockets.connect(client_ws_url(cluster), max_size=None) as ws:
            body = request(NET, input_ids=PROMPT, temperature=0, max_tokens=ANSWER)
            await ws.send(json.dumps({**body, "header": {**body["header"], "message_id": "b"}}))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
                replies.append(reply)
                if len(token_ids(replies)) == 3:  # on its chain: who holds its session?
                    counts = await wait_for_session_counts(homes, NET, [2, 1, 1, 1], CEILING)
                    assert counts == [2, 1, 1, 1], counts  # both on the first node, one each
                    on_replica.set()
                if reply.get("status") in ("success", "error") or "status" not in reply:
                    return replies

    async def go():
        started = asyncio.Event()
        task = None

        def start_second() -> None:
            nonlocal task
            task = asyncio.get_running_loop().create_task(second())
            started.set()

        async def kill_once_watched() -> None:
            await asyncio.wait_for(on_replica.wait(), CEILING)
            cluster.kill(1)

        first = await _answer(cluster, start_second, after=3, extra=kill_once_watched)
        await started.wait()
        return first, await task

    first, second_replies = asyncio.run(go())
    _assert_complete(first, undisturbed)
    _assert_complete(second_replies, undisturbed)
    now = _config(homes[0])
    assert [n.node_id for n in now.chain()] == [config.nodes[0].node_id, config.nodes[3].node_id]


@pytest.mark.skipif(sys.platform == "win32", reason="freezes a process with SIGSTOP")
def test_a_silent_backup_does_not_hold_up_new_conversations(with_backup, tmp_path):
    """Issue 16.8: no lock is held across chain I/O. The gateway frees, on the main chain and
    on the replica chain, a session left from before its restart, while the backup (the
    replica chain's node) is frozen (SIGSTOP): that close waits on a silent PC. Meanwhile a
    new conversation gets its first token; the close is still in flight when it does. (Before
    the fix the gateway held its sessions' lock across the close: every new conversation
    waited for the silent PC.)"""
    from tiktrue.database import Database
    from tiktrue.gateway.api_client import Gateway
    from tiktrue.gateway.session_store import SessionStore
    from tiktrue.model.sampling import SamplingParams
    from tiktrue.security.node_tls import NetworkCredentials

    cluster, homes, config = with_backup
    assert config.replica_chains(), "the backup makes a second chain"
    store = SessionStore(Database(tmp_path / "sessions.db"))
    store.put(NET, "left-over", PROMPT, [], [])  # live: the nodes may hold it
    frozen = cluster.processes[3]

    async def go():
        gateway = Gateway(
            homes[0], config, NetworkCredentials.load(homes[0], NET), session_store=store
        )
        params = SamplingParams(temperature=0, max_tokens=4)
        try:
            frozen.send_signal(signal.SIGSTOP)
            freeing = asyncio.create_task(gateway.sweeper.free_left_over())
            link = gateway.chain.transport.link
            async with asyncio.timeout(CEILING):
                while link.waiting == 0 and not freeing.done():  # the close is in flight
                    await asyncio.sleep(0.01)
            assert not freeing.done()
            stream = gateway.answer(params, text="Hello")
            async with asyncio.timeout(CEILING):
                first = await anext(stream)
            still_freeing = not freeing.done()
            frozen.send_signal(signal.SIGCONT)
            async for _ in stream:
                pass
            freed = await asyncio.wait_for(freeing, CEILING)
            return first, still_freeing, freed
        finally:
            frozen.send_signal(signal.SIGCONT)
            await gateway.aclose()

    first, still_freeing, freed = asyncio.run(go())
    assert first.text is not None
    assert still_freeing, "the new conversation waited for the silent backup"
    assert freed == ["left-over"]
