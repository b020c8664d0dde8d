"""The seed-000 journey with real processes: create a network, join by token and by approval,
plan, push the blocks, chat; refusals for bad tokens; blocks not sent twice; a re-plan mid-chat.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import websockets

from tests.helpers.cluster import ask, request, token_ids
from tests.helpers.network import control_address, import_model_from_store
from tests.integration.test_chain import reference_tokens
from tiktrue.control.config_sync import config_digest
from tiktrue.control.distributor import push_blocks
from tiktrue.control.network_admin import network_status, probe_announcement
from tiktrue.control.planner import ModelProfile, NodeCapacity
from tiktrue.control.plans import apply_network
from tiktrue.limits import MIN_AUTO_CONTEXT_TOKENS
from tiktrue.model.engine import Span
from tiktrue.model.store import BlockStore
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.node.resources import NodeCaps
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.security.node_tls import load_block_key, node_identity
from tiktrue.service.local_network import LocalCluster, prepare_local_network

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


@pytest.fixture
def office(office_made, tiny_llama):
    """The network as ``office_made`` left it, whatever the tests before this one did to it
    (a PC that left joins again, another plan is undone): every test starts from the same
    network, in any order, and runs alone too."""
    cluster, (admin, pc2, pc3) = office_made
    if node_identity(pc3).node_id not in read_config(config_path(admin, NET)).node_ids:
        token = cli(admin, "network", "token", NET).stdout.strip()
        cli(pc3, "network", "join", control_address(admin), "--token", token)
    config = read_config(config_path(admin, NET))
    spans = {n.node_id: n.blocks for n in config.nodes}
    if [spans.get(node_identity(h).node_id) for h in (admin, pc2, pc3)] != MANUAL_SPANS:
        cli(admin, "network", "apply", NET, *_manual_plan(admin, pc2, pc3))
        _wait_for_version(admin, NET, read_config(config_path(admin, NET)).version)
    return office_made


MANUAL_SPANS = [
    ["embed", "layer_0", "layer_1"],
    ["layer_2", "layer_3", "layer_4"],
    ["layer_5", "head"],
]


def _manual_plan(admin, pc2, pc3) -> list[str]:
    """``--override`` options of the office's manual plan: 3, 3 and 2 blocks."""
    ids = [node_identity(h).node_id for h in (admin, pc2, pc3)]
    overrides = [f"{ids[0]}=3", f"{ids[1]}=3", f"{ids[2]}=2"]
    return sum((["--override", o] for o in overrides), [])


@pytest.fixture(scope="module")
def office_made(journey, tiny_llama):
    """The journey up to a running network, as a user goes it: create, a join by token
    (refusals for a used and a made-up token), a join by approval, a manual plan applied."""
    cluster, (admin, pc2, pc3) = journey
    model_id = tiny_llama.model_id
    out = cli(
        admin, "network", "create", "Office", "--model", model_id, "--id", NET, "--manual-plan"
    )
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
    deadline = time.monotonic() + 120
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
    # the block key came after the join, over mutual TLS with each one's new certificate
    assert load_block_key(pc2, NET) == load_block_key(pc3, NET) == load_block_key(admin, NET)

    # plan with a manual split, push blocks, switch
    shown = cli(admin, "network", "plan", NET, *_manual_plan(admin, pc2, pc3))
    assert node_identity(pc2).node_id in shown.stdout
    applied = cli(admin, "network", "apply", NET, *_manual_plan(admin, pc2, pc3))
    assert "now runs config v" in applied.stdout

    return journey


def test_the_whole_journey(office, tiny_llama):
    cluster, (admin, pc2, pc3) = office
    model_id = tiny_llama.model_id
    ids = [node_identity(h).node_id for h in (admin, pc2, pc3)]
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


def test_blocks_already_held_are_not_sent_again(office, tiny_llama):
    _, (admin, pc2, _) = office
    config = read_config(config_path(admin, NET))
    store = BlockStore(admin / "models" / tiny_llama.model_id)
    node = config.node(node_identity(pc2).node_id)
    again = asyncio.run(push_blocks(admin, NET, store, node, node.blocks))
    assert again == {}
    # a block the node does not have yet is sent, and only that one
    extra = asyncio.run(push_blocks(admin, NET, store, node, [*node.blocks, "layer_5"]))
    assert set(extra) == {"layer_5"}
    assert extra["layer_5"] == store.manifest.blocks["layer_5"].bytes


def test_a_new_plan_mid_conversation_keeps_the_answer_correct(office, tiny_llama):
    cluster, (admin, pc2, pc3) = office
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
                await apply_network(admin, NET, overrides={ids[0]: 2, ids[1]: 4, ids[2]: 2})
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


def test_discovery_finds_the_running_nodes(office):
    from tiktrue.control.discovery import discover_networks

    _, homes = office
    ids = {node_identity(h).node_id for h in homes}
    # wait on the event (every node resolved), with a generous ceiling for a busy machine
    found = discover_networks(
        120, interfaces=["127.0.0.1"], until=lambda ns: ids <= {n.node_id for n in ns}
    )
    assert ids <= {n.node_id for n in found}, f"not every node was found: {found}"
    admin = next(n for n in found if n.node_id == node_identity(homes[0]).node_id)
    assert admin.networks[NET].role == "admin"
    manual = discover_networks(0, manual=[control_address(homes[1])], probe=probe_announcement)
    assert [n.node_id for n in manual] == [node_identity(homes[1]).node_id]


def test_a_pc_joining_mid_chat_gets_a_new_plan_and_the_chat_goes_on(tiny_llama, tmp_path):
    """With auto-plan (the default) a join re-plans and moves blocks by itself. Here each PC
    may give RAM for about a third of the model: it fits only once the third PC joins."""
    admin, pc2, late = (tmp_path / n for n in ("admin", "pc2", "late"))
    import_model_from_store(tiny_llama.root, admin / "models")
    model = ModelProfile.from_manifest(tiny_llama.manifest, tiny_llama.config())
    context = min(MIN_AUTO_CONTEXT_TOKENS, model.max_context)  # what the plan reserves
    third = (
        model.block_bytes["embed"]
        + 2 * (model.block_bytes["layer_0"] + model.kv_bytes(["layer_0"], context))
        + 4096
    )
    caps = NodeCaps(ram_bytes=NodeCapacity("x", 1, 1, 1.0).runtime_bytes + third)
    for home in (admin, pc2, late):
        home.mkdir(exist_ok=True)
        (home / "caps.json").write_text(caps.model_dump_json())
    with LocalCluster([admin, pc2], kv_budget_mb=16) as cluster:
        cli(admin, "network", "create", "Lab", "--model", tiny_llama.model_id, "--id", "lab")
        cli(pc2, "network", "join", control_address(admin), "--token", _token(admin, "lab"))
        first_version = _wait_for_version(admin, "lab", 2)
        _wait_for_log(admin, "network lab: re-plan after a join failed")  # too little RAM
        assert read_config(config_path(admin, "lab")).version == first_version
        ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"

        async def conversation(sid, between):
            async with websockets.connect(ws_url) as ws:
                body = {"temperature": 0, "max_tokens": 6, "session_id": sid}
                one = await ask(ws, request("lab", input_ids=[7, 250, 31], **body))
                await asyncio.to_thread(between)
                two = await ask(ws, request("lab", input_ids=[9, 10], **body))
            return token_ids(one), token_ids(two), two[-1]

        def join_late() -> None:
            cli(late, "network", "join", control_address(admin), "--token", _token(admin, "lab"))
            _wait_for_version(admin, "lab", first_version + 2)  # the join, then the new plan

        steady = asyncio.run(conversation("steady", lambda: None))
        with LocalCluster([late], kv_budget_mb=16, gateway=False):
            moved = asyncio.run(conversation("moved", join_late))
            status = asyncio.run(network_status(admin, "lab"))
    assert [n["state"] for n in status["nodes"]] == ["serving"] * 3, status
    assert moved[2].get("status") == "success", moved[2]
    assert moved[:2] == steady[:2]


def _token(admin, network_id) -> str:
    return cli(admin, "network", "token", network_id).stdout.strip()


def _wait_for_log(home, text: str, timeout: float = 120) -> None:
    """Until the node's log says ``text`` (an event the test cannot see otherwise)."""
    deadline = time.monotonic() + timeout
    while text not in (home / "node.log").read_text("utf-8", errors="replace"):
        assert time.monotonic() < deadline, f"{home / 'node.log'} never said {text!r}"
        time.sleep(0.3)


def _wait_for_version(home, network_id: str, version: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = read_config(config_path(home, network_id)).version
        if current >= version:
            status = asyncio.run(network_status(home, network_id))
            if all(n["state"] == "serving" or not n["blocks"] for n in status["nodes"]):
                return current
        time.sleep(0.3)
    raise AssertionError(f"network {network_id} did not reach config v{version}")


def test_a_pc_leaving_gracefully_hands_its_blocks_over(office, tiny_llama):
    cluster, (admin, pc2, pc3) = office
    leaver = node_identity(pc3).node_id
    version = read_config(config_path(admin, NET)).version
    out = cli(pc3, "network", "leave", NET)
    assert f"left network {NET}" in out.stdout
    config = read_config(config_path(admin, NET))
    assert config.version > version and leaver not in {n.node_id for n in config.nodes}
    assert not config_path(pc3, NET).exists()
    _wait_for_version(admin, NET, config.version)
    ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"

    async def go():
        async with websockets.connect(ws_url) as ws:
            body = request(NET, input_ids=[5, 17, 42, 99], temperature=0, max_tokens=10)
            return await ask(ws, body)

    assert token_ids(asyncio.run(go())) == reference_tokens(tiny_llama, [5, 17, 42, 99], 10)


def test_an_interrupted_push_resumes_from_the_last_good_chunk(office, tiny_llama):
    _, (admin, pc2, _) = office
    from tiktrue.model.store import MANIFEST, hash_chunks

    copy_root = admin / "models" / "resume-copy"
    shutil.copytree(admin / "models" / tiny_llama.model_id, copy_root)
    manifest = json.loads((copy_root / MANIFEST).read_text())
    manifest["model_id"] = "resume-copy"
    for entry in manifest["blocks"].values():  # small chunks: a block is many chunks
        entry["chunk_size"] = 4096
        entry["sha256"], entry["chunks"] = hash_chunks(copy_root / entry["file"], 4096)
    (copy_root / MANIFEST).write_text(json.dumps(manifest))
    store = BlockStore(copy_root)
    node = read_config(config_path(admin, NET)).node(node_identity(pc2).node_id)
    chunks_seen = []

    def interrupt(progress) -> None:
        if progress.block == "layer_0":
            chunks_seen.append(progress.sent_bytes)
            if len(chunks_seen) == 5:
                raise ConnectionError("cable pulled")

    with pytest.raises(ConnectionError):
        asyncio.run(push_blocks(admin, NET, store, node, ["layer_0"], progress=interrupt))
    sent = asyncio.run(push_blocks(admin, NET, store, node, ["layer_0"]))
    size = store.manifest.blocks["layer_0"].bytes
    assert sent["layer_0"] == size - 5 * 4096
    received = pc2 / "models" / "resume-copy" / "blocks" / "layer_0.safetensors"
    assert received.read_bytes() == (copy_root / "blocks" / "layer_0.safetensors").read_bytes()


HELD_CLI = '''"""`tiktrue` that waits, the first time it asks for a new config to be committed (the
node service's writer, or, in the code before it, the first phase of its own broadcast),
until the test says go: the moment a failover can slip in."""
import asyncio
import os
import sys
from pathlib import Path

from tiktrue.node.control_link import ControlLink

hold = Path(os.environ["TIKTRUE_TEST_HOLD"])
call = ControlLink.call


async def held(self, op, payload=None, **fields):
    if op in ("config_change", "config_prepare") and not hold.exists():
        hold.write_text(op)
        while not (hold.parent / "go").exists():
            await asyncio.sleep(0.05)
    return await call(self, op, payload, **fields)


ControlLink.call = held
from tiktrue.cli import app  # noqa: E402

sys.argv[0] = "tiktrue"
app()
'''


def test_a_cli_apply_racing_a_failover_plans_again_and_loses_no_version(tiny_llama, tmp_path):
    """`tiktrue network apply` measures and plans against v1 and pushes its blocks; as it
    commits, a worker dies and the admin's failover commits v2 (its backup takes over). The
    apply must not land on top of v2 (before the one writer, it wrote v2 too: two configs of
    one version, one of them dropped by the conflict rule, which could undo the failover):
    it plans again on v2 and commits v3. Every live node ends on v3; no conflict anywhere."""
    order = tiny_llama.manifest.model_chain_order
    half = len(order) // 2
    homes, _ = prepare_local_network(
        tmp_path / "net",
        tiny_llama,
        network_id="race",
        spans=[Span(tuple(order[:half])), Span(tuple(order[half:]))],
        backups=[Span(tuple(order[half:]))],
    )
    admin, worker, backup = homes
    lost = node_identity(worker).node_id
    (tmp_path / "held_cli.py").write_text(HELD_CLI)
    hold = tmp_path / "hold"
    env = {**os.environ, "TIKTRUE_HOME": str(admin), "TIKTRUE_TEST_HOLD": str(hold)}
    with LocalCluster(homes, kv_budget_mb=16) as cluster:
        _wait_for_version(admin, "race", 1)
        applying = subprocess.Popen(
            [sys.executable, str(tmp_path / "held_cli.py"), "network", "apply", "race"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(hold.exists, "the apply to reach its commit", applying)
            cluster.kill(1)  # the worker's PC goes off: the admin's backup takes over
            _wait_for(lambda: _failover(admin, lost), "the failover of the worker", applying)
            (tmp_path / "go").write_text("")
            out, err = applying.communicate(timeout=300)
        finally:
            applying.kill()
        done = _failover(admin, lost)
        final = read_config(config_path(admin, "race"))
        held = read_config(config_path(backup, "race"))
    assert applying.returncode == 0, err
    assert done == "backup took over (config v2)", done
    assert "moved to config v2" in err and "planning again" in err, err
    assert f"now runs config v{final.version}" in out and final.version == 3, out
    assert lost not in {n.node_id for n in final.chain()}  # the failover was not undone
    assert config_digest(held) == config_digest(final)
    for home in (admin, backup):
        events = {e["event"] for e in recent_events(events_path(home), 1000, "race")}
        assert "config_conflict" not in events, home


def _wait_for(check, what: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            raise AssertionError(f"the CLI ended before {what}: {process.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _failover(home, node_id: str) -> str | None:
    """What the admin's failover of ``node_id`` did (its event), once it is done."""
    for event in recent_events(events_path(home), 1000, "race"):
        if event["event"] == "failover" and event.get("node_id") == node_id:
            return event["done"]
    return None
