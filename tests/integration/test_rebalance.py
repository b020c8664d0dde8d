"""Rebalancing on real node processes: one PC of the chain is slow (its span worker stays busy
50 ms a round); after a few chats ``tiktrue network rebalance`` names it from the metrics
history, proposes a plan that gives it fewer layers with the gain it expects, and changes
nothing; with ``--apply`` (the admin's OK) the blocks move, the chain switches, and an answer
is still the one-process engine's."""

from __future__ import annotations

import asyncio
import re

import pytest
import websockets

from tests.helpers.cluster import ask, client_ws_url, token_ids
from tests.integration.test_chain import PROMPTS, greedy, reference_tokens
from tests.integration.test_metrics import run_cli
from tiktrue.control.resource_optimizer import MIN_STEPS
from tiktrue.model.engine import Span
from tiktrue.node.served_span import SLOW_STEP_ENV
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "testnet"  # the chain helpers' network


@pytest.fixture
def slow_middle(tiny_llama, tmp_path):
    order = tiny_llama.manifest.model_chain_order
    spans = [
        Span.of(order, "embed", "layer_1"),
        Span.of(order, "layer_2", "layer_3"),
        Span.of(order, "layer_4", "head"),
    ]
    homes, config = prepare_local_network(tmp_path / "c", tiny_llama, spans=spans, network_id=NET)
    cluster = LocalCluster(homes, kv_budget_mb=16, node_env={1: {SLOW_STEP_ENV: "0.05"}})
    cluster.start()
    try:
        yield cluster, homes, config
    finally:
        cluster.stop()


def test_the_slow_pc_is_named_and_its_layers_move_only_with_the_admins_ok(slow_middle, tiny_llama):
    cluster, homes, config = slow_middle
    slow = config.nodes[1]

    async def chats() -> list[list[int]]:
        async with websockets.connect(client_ws_url(cluster)) as ws:
            return [token_ids(await ask(ws, greedy(p, MIN_STEPS + 4))) for p in PROMPTS[:2]]

    asyncio.run(chats())
    shown = run_cli(homes[0], "network", "rebalance", NET).stdout
    assert f"slowest: {slow.name or slow.node_id}" in shown, shown
    assert "faster" in shown and f"{slow.node_id}: layer_2..layer_3 ->" in shown, shown
    assert read_config(config_path(homes[0], NET)).version == config.version  # nothing moved

    applied = run_cli(homes[0], "network", "rebalance", NET, "--apply").stdout
    moved = re.search(rf"{slow.node_id}: layer_2\.\.layer_3 -> (\S+)", applied)
    assert moved is not None and moved.group(1) != "layer_2..layer_3", applied
    version = int(re.search(r"now runs config v(\d+)", applied).group(1))
    assert version == config.version + 1
    # (a chain switch on a loaded PC may make the admin probe a node and re-plan: later
    # versions are the failover's, not the rebalancing's)
    assert read_config(config_path(homes[0], NET)).version >= version

    async def answer() -> list[int]:
        async with websockets.connect(client_ws_url(cluster)) as ws:
            return token_ids(await ask(ws, greedy(PROMPTS[0], 12)))

    assert asyncio.run(answer()) == reference_tokens(tiny_llama, PROMPTS[0], 12)
