"""No tampered block is ever used (issue 9, item 5), with real node processes.

One cluster (three nodes; the admin runs the gateway and holds the whole model), two stories:

1. a worker starts with a damaged block file: it stays up (control channel included), its
   span answers ``corrupt_block`` naming the block, never a token; the admin is told; its
   own copy is damaged too, so the repair fails and says so until that copy is mended; then
   the block is pushed again, the span starts, and the answer is the reference one;
2. a bit flips in a block file of that worker while a conversation runs: the next step is
   served from the verified copy in memory (the same tokens as an undisturbed conversation),
   the admin is told, the file is repaired, and the same prompt gives the same tokens.

And on a cluster of its own: a worker starts with a block file missing altogether; it waits
naming the block, the admin pushes it, the span starts and answers as the reference does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import time

import pytest
import websockets

from tests.helpers.cluster import ask, request, token_ids
from tests.integration.test_chain import client_ws_url, reference_tokens
from tests.integration.test_health import wait_for
from tiktrue.model.engine import Span
from tiktrue.model.store import BlockStore
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.node.control_link import ControlLink
from tiktrue.paths import run_file
from tiktrue.security.node_tls import NetworkCredentials, node_identity
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "blocknet"
PROMPT = [5, 17, 42, 99]
FOLLOW_UP = [7, 250, 31]


def flip_a_weight_bit(path, tensor: str) -> None:
    """Flip the top exponent bit of the first fp32 weight of ``tensor``, in place (same
    size, same inode): a weight of about 0.02 becomes about 1e37."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length + json.loads(data[8 : 8 + length])[tensor]["data_offsets"][0]
    with path.open("r+b") as handle:
        handle.seek(start + 3)
        byte = handle.read(1)[0]
        handle.seek(start + 3)
        handle.write(bytes([byte ^ 0x40]))


def own_copies(home) -> None:
    """The homes hard-link the session's tiny store: give this one copies it may damage."""
    for path in (home / "models").rglob("*.safetensors"):
        copy = path.with_name(path.name + ".copy")
        shutil.copyfile(path, copy)
        copy.replace(path)


def events(home, name: str, node_id: str, since: float) -> list[dict]:
    return [
        e
        for e in recent_events(events_path(home), 1000, NET)
        if e["event"] == name and e["node_id"] == node_id and e["time"] >= since
    ]


async def answer(ws_url: str, prompt: list[int], n: int = 8, **extra) -> list[dict]:
    async with websockets.connect(ws_url) as ws:
        return await ask(ws, request(NET, input_ids=prompt, temperature=0, max_tokens=n, **extra))


async def node_info(home) -> dict:
    control = json.loads(run_file(home).read_text())["control"]
    credentials = NetworkCredentials.load(home, NET)
    async with ControlLink(control, expected_node_id=None, credentials=credentials) as link:
        return await link.call("node_info")


def three_spans(tiny_llama, tmp_path):
    order = tiny_llama.manifest.model_chain_order
    spans = [
        Span.of(order, "embed", "layer_1"),
        Span.of(order, "layer_2", "layer_3"),
        Span.of(order, "layer_4", "head"),
    ]
    homes, _ = prepare_local_network(tmp_path / "cluster", tiny_llama, spans=spans, network_id=NET)
    return homes


@pytest.fixture
def damaged_cluster(tiny_llama, tmp_path):
    homes = three_spans(tiny_llama, tmp_path)
    for home in homes[:2]:
        own_copies(home)
    layer_2 = "model.layers.2.mlp.down_proj.weight"
    for home in homes[:2]:  # the worker's copy, and the admin's (the source of repairs)
        flip_a_weight_bit(
            home / "models" / tiny_llama.model_id / "blocks/layer_2.safetensors", layer_2
        )
    cluster = LocalCluster(homes, kv_budget_mb=16)
    cluster.start()  # every node starts, the damaged one too
    try:
        yield cluster, homes
    finally:
        cluster.stop()


def test_a_damaged_block_is_never_used_and_is_repaired(damaged_cluster, tiny_llama):
    cluster, homes = damaged_cluster
    admin, worker = homes[0], homes[1]
    worker_id = node_identity(worker).node_id
    worker_store = worker / "models" / tiny_llama.model_id
    ws_url = client_ws_url(cluster)
    expected = reference_tokens(tiny_llama, PROMPT, 8)

    # 1. started damaged: the control channel answers, the span refuses by name
    info = asyncio.run(node_info(worker))["networks"][NET]
    assert info["serving"] is False and "layer_2" in info["block_faults"]
    assert "damaged" in info["waiting"]
    wait_for(lambda: events(admin, "block_corrupt", worker_id, 0), "the admin hears of it")
    failed = wait_for(lambda: events(admin, "block_repair_failed", worker_id, 0), "no source")
    assert "admin's own copy of layer_2" in failed[0]["message"]
    replies = asyncio.run(answer(ws_url, PROMPT))
    assert not token_ids(replies)
    error = replies[-1]
    assert error["header"]["message_type"] == "error", error
    assert error["code"] == "corrupt_block" and "layer_2" in error["message"]

    # the admin's copy is mended: the next try pushes the block, the span starts
    source = tiny_llama.block_path("layer_2")
    mended = admin / "models" / tiny_llama.model_id / "blocks/layer_2.safetensors"
    shutil.copyfile(source, mended.with_suffix(".new"))
    mended.with_suffix(".new").replace(mended)
    wait_for(lambda: events(admin, "block_repaired", worker_id, 0), "repaired", timeout=180)
    assert BlockStore(worker_store).check_block("layer_2") is None
    wait_for(lambda: asyncio.run(node_info(worker))["networks"][NET]["serving"], "the span serves")
    assert token_ids(asyncio.run(answer(ws_url, PROMPT))) == expected

    # 2. a bit flips while a conversation runs: the verified copy in memory serves on
    async def converse(session_id: str, between=None) -> list[int]:
        async with websockets.connect(ws_url) as ws:
            first = request(
                NET, input_ids=PROMPT, temperature=0, max_tokens=6, session_id=session_id
            )
            await ask(ws, first)
            if between is not None:
                between()
            second = request(
                NET, input_ids=FOLLOW_UP, temperature=0, max_tokens=6, session_id=session_id
            )
            return token_ids(await ask(ws, second))

    undisturbed = asyncio.run(converse("calm"))
    mark = time.time()
    layer_3 = worker_store / "blocks/layer_3.safetensors"
    flipped = asyncio.run(
        converse(
            "flipped", lambda: flip_a_weight_bit(layer_3, "model.layers.3.mlp.down_proj.weight")
        )
    )
    assert flipped == undisturbed
    found = wait_for(lambda: events(admin, "block_corrupt", worker_id, mark), "told", 180)
    assert found[0]["blocks"].keys() == {"layer_3"} and found[0]["serving"] is True
    wait_for(lambda: events(admin, "block_repaired", worker_id, mark), "repaired", timeout=180)
    assert BlockStore(worker_store).check_block("layer_3") is None
    assert token_ids(asyncio.run(answer(ws_url, PROMPT))) == expected


def test_a_block_file_missing_at_start_is_pushed_again(tiny_llama, tmp_path):
    homes = three_spans(tiny_llama, tmp_path)
    admin, worker = homes[0], homes[1]
    own_copies(worker)
    (worker / "models" / tiny_llama.model_id / "blocks/layer_3.safetensors").unlink()
    cluster = LocalCluster(homes, kv_budget_mb=16)
    cluster.start()
    try:
        worker_id = node_identity(worker).node_id
        told = wait_for(lambda: events(admin, "block_corrupt", worker_id, 0), "told")
        assert told[0]["blocks"] == {"layer_3": "missing"}
        wait_for(
            lambda: asyncio.run(node_info(worker))["networks"][NET]["serving"],
            "the span serves once the admin pushed the block",
            timeout=180,
        )
        store = BlockStore(worker / "models" / tiny_llama.model_id)
        assert store.check_block("layer_3") is None
        expected = reference_tokens(tiny_llama, PROMPT, 8)
        assert token_ids(asyncio.run(answer(client_ws_url(cluster), PROMPT))) == expected
        wait_for(lambda: events(admin, "block_repaired", worker_id, 0), "repaired")
    finally:
        cluster.stop()
