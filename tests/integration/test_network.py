"""The seed-000 journey with real processes: create a network, join by token and by approval,
plan, push the blocks, chat; refusals for bad tokens; blocks not sent twice; a re-plan mid-chat.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
import websockets

from tests.helpers.cluster import ask, request, token_ids
from tests.integration.test_chain import reference_tokens
from tiktrue.control.distributor import push_blocks
from tiktrue.control.local_network import LocalCluster
from tiktrue.control.network_admin import apply_plan, make_plan, network_status
from tiktrue.control.network_config import config_path, read_config
from tiktrue.model.store import BlockStore
from tiktrue.security.node_tls import node_identity

pytestmark = pytest.mark.integration
NET = "journey"


def cli(home, *args, check=True, timeout=120):
    env = {**os.environ, "TIKTRUE_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "tiktrue", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"tiktrue {' '.join(args)}:\n{done.stdout}\n{done.stderr}")
    return done


def control_address(home) -> str:
    return json.loads((home / "run" / "node.json").read_text())["control"]


@pytest.fixture(scope="module")
def journey(tiny_llama, tmp_path_factory):
    base = tmp_path_factory.mktemp("journey")
    homes = [base / f"pc{i}" for i in range(1, 4)]
    for home in homes:
        home.mkdir()
    source = tiny_llama.root
    import_model_from_store(source, homes[0] / "models")
    cluster = LocalCluster(homes, kv_budget_mb=16).start()
    try:
        yield cluster, homes
    finally:
        cluster.stop()


def import_model_from_store(store_root, models_dir):
    """The admin PC holds the whole model (as `tiktrue models import` leaves it)."""
    import shutil

    models_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(store_root, models_dir / store_root.name)


def test_the_whole_journey(journey, tiny_llama):
    cluster, (admin, pc2, pc3) = journey
    model_id = tiny_llama.model_id
    out = cli(admin, "network", "create", "Office", "--model", model_id, "--id", NET)
    assert f"created network {NET}" in out.stdout

    # pc2 joins with a one-time token
    token = cli(admin, "network", "token", NET).stdout.strip()
    joined = cli(pc2, "network", "join", control_address(admin), "--token", token)
    assert f"joined network {NET}" in joined.stdout
    # the same token again is refused, and so is a made-up one
    reused = cli(pc3, "network", "join", control_address(admin), "--token", token, check=False)
    assert reused.returncode == 1 and "already used" in reused.stderr
    forged = token.rsplit(".", 1)[0] + ".not-a-secret"
    bad = cli(pc3, "network", "join", control_address(admin), "--token", forged, check=False)
    assert bad.returncode == 1 and "unknown join token" in bad.stderr

    # pc3 asks to join and the admin approves
    admin_id = node_identity(admin).node_id
    env = {**os.environ, "TIKTRUE_HOME": str(pc3)}
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tiktrue",
            "network",
            "join",
            control_address(admin),
            "--network",
            NET,
            "--admin-node",
            admin_id,
            "--wait",
            "60",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    request_id = None
    deadline = time.monotonic() + 60
    while request_id is None and time.monotonic() < deadline:
        lines = cli(admin, "network", "pending", NET).stdout.split()
        request_id = lines[0] if lines else None
        time.sleep(0.3)
    assert request_id, "the join request never reached the admin"
    cli(admin, "network", "approve", NET, request_id)
    stdout, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, stderr
    assert f"joined network {NET}" in stdout

    config = read_config(config_path(admin, NET))
    assert len(config.nodes) == 3

    # plan with a manual split, push blocks, switch
    ids = [node_identity(h).node_id for h in (admin, pc2, pc3)]
    overrides = [f"{ids[0]}=3", f"{ids[1]}=3", f"{ids[2]}=2"]
    shown = cli(admin, "network", "plan", NET, *sum((["--override", o] for o in overrides), []))
    assert ids[1] in shown.stdout
    applied = cli(admin, "network", "apply", NET, *sum((["--override", o] for o in overrides), []))
    assert "now runs config v" in applied.stdout

    status = json.loads(cli(admin, "network", "status", NET, "--json").stdout)
    states = {n["node_id"]: n["state"] for n in status["nodes"]}
    assert all(state == "serving" for state in states.values()), status
    spans = {n["node_id"]: n["blocks"] for n in status["nodes"]}
    assert spans[ids[0]] == ["embed", "layer_0", "layer_1"] and spans[ids[2]] == ["layer_5", "head"]
    # pc3 holds only its own blocks
    held = sorted(p.name for p in (pc3 / "models" / model_id / "blocks").iterdir())
    assert held == ["head.safetensors", "layer_5.safetensors"]

    # chat through the new chain equals the one-process engine
    async def go():
        ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
        async with websockets.connect(ws_url) as ws:
            return await ask(
                ws, request(NET, input_ids=[5, 17, 42, 99], temperature=0, max_tokens=10)
            )

    replies = asyncio.run(go())
    assert token_ids(replies) == reference_tokens(tiny_llama, [5, 17, 42, 99], 10)


def test_blocks_already_held_are_not_sent_again(journey, tiny_llama):
    _, (admin, pc2, _) = journey
    config = read_config(config_path(admin, NET))
    store = BlockStore(admin / "models" / tiny_llama.model_id)
    node = config.node(node_identity(pc2).node_id)
    again = asyncio.run(push_blocks(admin, NET, store, node, node.blocks))
    assert again == {}
    # a block the node does not have yet is sent, and only that one
    extra = asyncio.run(push_blocks(admin, NET, store, node, [*node.blocks, "layer_5"]))
    assert set(extra) == {"layer_5"}
    assert extra["layer_5"] == store.manifest.blocks["layer_5"].bytes


def test_a_new_plan_mid_conversation_keeps_the_answer_correct(journey, tiny_llama):
    cluster, (admin, pc2, pc3) = journey
    ids = [node_identity(h).node_id for h in (admin, pc2, pc3)]
    ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
    prompt, more = [7, 250, 31], [9, 10]

    async def conversation(replan: bool):
        sid = f"talk-{replan}"
        async with websockets.connect(ws_url) as ws:
            first = await ask(
                ws, request(NET, input_ids=prompt, temperature=0, max_tokens=5, session_id=sid)
            )
            if replan:
                plan, _ = await make_plan(admin, NET, overrides={ids[0]: 2, ids[1]: 4, ids[2]: 2})
                await apply_plan(admin, NET, plan)
            second = await ask(
                ws, request(NET, input_ids=more, temperature=0, max_tokens=5, session_id=sid)
            )
        return token_ids(first), token_ids(second), second[-1]

    steady = asyncio.run(conversation(False))
    moved = asyncio.run(conversation(True))
    assert moved[2].get("status") == "success", moved[2]
    assert moved[:2] == steady[:2]
    status = asyncio.run(network_status(admin, NET))
    spans = {n["node_id"]: n["blocks"] for n in status["nodes"]}
    assert spans[ids[1]] == ["layer_1", "layer_2", "layer_3", "layer_4"]
