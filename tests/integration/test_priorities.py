"""Priority classes on real node processes with the demo's model: under load, with a deep and
then a quick request queued at the chain's first node, the quick one's first token comes
first; each answer is the one-process model's for its prompt (a class changes the order,
never the tokens).

Ordered by events: the deep request is sent first and seen waiting in the first node's queue
(``tiktrue_span_queue_steps``) before the quick one is sent; the order of the two first
tokens is the order of their replies on one ``/ws`` connection. Each answers one token: its
prompt's, which a span worker always computes alone, never in a batch (decode steps batched
with the load's round differently with the int4/int8 weights: docs/benchmarks.md, the
concurrency runs; that is no matter of classes). That node's span is slowed
(``TIKTRUE_CHAOS_STEP_DELAY_S``), so the load (three long chats) keeps decode steps queued
there at every round (while some compute, the others' steps come back): the deep step waits
behind them (deep ranks below normal) until it has aged ``AGE_ROUNDS`` rounds, and the quick
one ranks above them. First come, first served, the deep request's first token comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import httpx
import pytest
import websockets

from tests.helpers.cluster import client_ws_url, request
from tests.integration.test_metrics import sample
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.generation import GenerationResult, LocalChain, stream_tokens
from tiktrue.model.sampling import SamplingParams
from tiktrue.model.tokenizer import load_tokenizer, prompt_ids
from tiktrue.node.served_span import SLOW_STEP_ENV
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "prionet"
ROUND_S = "1.0"  # every round of the first node's span worker takes at least this long
DEEP = "Explain in detail how a steam engine works."
QUICK = "The capital of France is"
LOAD = "Write a long story about a lighthouse keeper and the sea."
LOAD_CHATS = 3  # normal chats answering all along: a decode step of theirs waits at every round


@pytest.fixture
def slow_first_node(demo_store, tmp_path):
    homes, _ = prepare_local_network(tmp_path / "cluster", demo_store, network_id=NET)
    cluster = LocalCluster(homes, kv_budget_mb=64, node_env={0: {SLOW_STEP_ENV: ROUND_S}})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def ask_for(prompt: str, message_id: str, priority: str | None, max_tokens: int) -> dict:
    """A chat turn (a session of its own: the chat template applies), greedy."""
    extra = {"priority": priority} if priority else {}
    return request(
        NET,
        message_id=message_id,
        session_id=f"{message_id}-{uuid.uuid4().hex[:8]}",
        prompt=prompt,
        temperature=0,
        max_tokens=max_tokens,
        **extra,
    )


async def keep_busy(url: str, stop: asyncio.Event) -> None:
    """A normal chat after another, until told to stop: the decode load."""
    async with websockets.connect(url) as ws:
        while not stop.is_set():
            await ws.send(json.dumps(ask_for(LOAD, "load", None, 200)))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("status") != "processing":
                    assert reply.get("status") == "success", reply
                    break


async def queued(http: httpx.AsyncClient, url: str, priority: str) -> float:
    text = (await http.get(url)).text
    return sample(text, "tiktrue_span_queue_steps", network=NET, **{"class": priority})


async def until(condition, what: str, load: list[asyncio.Task], ceiling: float = 120.0):
    async def wait() -> None:
        while not await condition():
            for task in load:  # a load that failed says why
                if task.done():
                    task.result()
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(wait(), ceiling)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what} did not happen in {ceiling:.0f} s") from None


def test_under_load_the_quick_request_answers_before_the_deep_one(slow_first_node, demo_store):
    cluster = slow_first_node
    url = client_ws_url(cluster)
    metrics = cluster.api_url.removesuffix("/v1") + "/metrics"

    async def go() -> tuple[list[str], dict[str, list[int]]]:
        stop = asyncio.Event()
        load = [asyncio.create_task(keep_busy(url, stop)) for _ in range(LOAD_CHATS)]
        firsts: list[str] = []
        tokens: dict[str, list[int]] = {"deep": [], "quick": []}
        async with httpx.AsyncClient(timeout=120) as http, websockets.connect(url) as ws:
            await until(lambda: steps_run(http, metrics), "the load's decode steps", load)

            async def read() -> None:
                done = set()
                while len(done) < 2:
                    reply = json.loads(await ws.recv())
                    which = reply.get("in_reply_to")
                    assert reply["header"]["message_type"] != "error", reply
                    if reply.get("status") == "processing" and which not in firsts:
                        firsts.append(which)  # its first token
                    elif reply.get("status") == "success":
                        tokens[which] = reply["payload"]["output_tokens"]
                        done.add(which)

            reader = asyncio.create_task(read())
            await ws.send(json.dumps(ask_for(DEEP, "deep", "deep", 1)))
            await until(lambda: has_queued(http, metrics, "deep"), "the deep step waiting", load)
            await ws.send(json.dumps(ask_for(QUICK, "quick", "quick", 1)))
            await asyncio.wait_for(reader, 300)
        stop.set()
        for task in load:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await task
        return firsts, tokens

    async def steps_run(http, url) -> bool:  # the loads decode, batched
        text = (await http.get(url)).text
        return sample(text, "tiktrue_span_batched_steps_total", network=NET) > 0

    async def has_queued(http, url, priority) -> bool:
        return await queued(http, url, priority) >= 1

    firsts, tokens = asyncio.run(go())
    assert all(tokens.values()), tokens  # each had a first token to stream
    assert firsts == ["quick", "deep"]
    # each answer is the one-process model's, whatever its class and its batches' company
    assert tokens == alone(demo_store, {"deep": DEEP, "quick": QUICK}, tokens)


def alone(store, prompts: dict[str, str], like: dict[str, list[int]]) -> dict[str, list[int]]:
    """Greedy tokens of the one-process model for each chat prompt (one engine for all)."""
    chain = LocalChain([BlockEngine(store, Span(tuple(store.manifest.model_chain_order)))])
    tokenizer = load_tokenizer(store)

    async def answer(which: str, prompt: str) -> list[int]:
        chain.open(which)
        result = GenerationResult()
        async for _ in stream_tokens(
            chain,
            prompt_ids(tokenizer, [{"role": "user", "content": prompt}]),
            SamplingParams(temperature=0, max_tokens=len(like[which])),
            tokenizer=tokenizer,
            stop_ids=set(),
            session_id=which,
            result=result,
        ):
            pass
        return result.token_ids

    return {which: asyncio.run(answer(which, prompt)) for which, prompt in prompts.items()}
