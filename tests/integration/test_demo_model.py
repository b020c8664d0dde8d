"""What a user of the demo meets, through the gateway on real node processes: the demo's real
model (SmolLM2-135M-Instruct, fetched as the demo fetches it) with its default int4/int8
weights, served by three PCs and a backup. Several people at once, with the model's own
sampling settings and greedy; a worker lost mid-answer. Where a user can compare two answers
(a chat alone and among others; before and after a failover) they are the same tokens.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.cluster import openai_client
from tiktrue.model.engine import Span
from tiktrue.protocol.network_config import config_path, read_config, write_config
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "demo-tests"
CEILING = 300  # seconds for one answer: a bound for a busy machine, never a timing claim
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about rain.",
    "What is two plus two?",
    "Who wrote Hamlet?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Describe the sea in one sentence.",
]


@pytest.fixture(scope="module")
def demo_network(demo_store, tmp_path_factory):
    """Three PCs (the admin with the gateway, two workers) and a backup of both workers."""
    order = demo_store.manifest.model_chain_order  # embed, layer_0..layer_29, head
    spans = [
        Span.of(order, "embed", "layer_9"),
        Span.of(order, "layer_10", "layer_19"),
        Span.of(order, "layer_20", "head"),
    ]
    homes, config = prepare_local_network(
        tmp_path_factory.mktemp("demo"),
        demo_store,
        spans=spans,
        backups=[Span.of(order, "layer_10", "head")],
        network_id=NET,
    )
    config = config.model_copy(update={"backup_nodes": 1})  # kept when planned again
    for home in homes:
        write_config(home, config)
    cluster = LocalCluster(homes, kv_budget_mb=64).start()
    try:
        yield cluster, homes
    finally:
        for process in cluster.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
        cluster.stop()


def _chat(client, model: str, question: str, max_tokens: int, on_token=None, **settings):
    """One streamed chat completion (the OpenAI API, as a person's client sends it): its text.
    ``settings`` left out come from the model (its generation_config.json). ``on_token(n)``
    hears the count of chunks with text so far."""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        stream=True,
        timeout=CEILING,
        **settings,
    )
    text = []
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            text.append(delta)
            if on_token is not None:
                on_token(len(text))
    return "".join(text)


def _at_once(client, model: str, **settings) -> list[str]:
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        asked = [pool.submit(_chat, client, model, q, 24, **settings) for q in QUESTIONS]
        return [a.result() for a in asked]


def test_eight_people_at_once_get_what_each_would_alone(demo_network, demo_store):
    """Eight chats at once: with the model's own sampling settings all eight answer, twice;
    greedy, each is the same text as the same chat alone."""
    cluster, homes = demo_network
    client, model = openai_client(cluster, homes[0]), demo_store.model_id
    for _ in range(2):  # sampled (the model's temperature, top-p...): every one answers
        assert all(_at_once(client, model))
    alone = [_chat(client, model, q, 24, temperature=0) for q in QUESTIONS]
    assert all(alone)
    assert _at_once(client, model, temperature=0) == alone


def test_a_worker_lost_mid_answer_leaves_the_answer_unchanged(demo_network, demo_store):
    """A worker killed while a greedy answer streams: the backup takes its span over, the
    session is replayed there, and the answer is the same text as undisturbed."""
    cluster, homes = demo_network
    client, model = openai_client(cluster, homes[0]), demo_store.model_id
    question = "Write a long story about a cat."
    undisturbed = _chat(client, model, question, 48, temperature=0)
    before = read_config(config_path(homes[0], NET)).version

    def kill_at(count: int) -> None:
        if count == 8:
            cluster.kill(1)  # the first worker (layer_10..layer_19)

    disturbed = _chat(client, model, question, 48, on_token=kill_at, temperature=0)
    assert read_config(config_path(homes[0], NET)).version > before  # a failover happened
    assert disturbed == undisturbed
