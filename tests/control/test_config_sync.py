"""Config sync: which config wins, and (with real node processes) the two-phase switch, lost
acknowledgements, nodes away during a push, and a node that returns on a new control port."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import websockets

from tests.helpers.cluster import ask, request, token_ids
from tests.helpers.network import (
    NodeProcesses,
    control_address,
    import_model_from_store,
    wait_until,
)
from tests.integration.test_chain import reference_tokens
from tiktrue.control.config_signing import sign_config
from tiktrue.control.config_sync import (
    SyncError,
    broadcast_config_updates,
    config_digest,
    handle_config_conflicts,
    missing_blocks,
    with_control_port,
)
from tiktrue.control.join import create_join_token, join_network
from tiktrue.control.local_service import poke_local_service
from tiktrue.control.network_admin import network_status
from tiktrue.control.network_manager import admin_ca, create_network
from tiktrue.control.plans import apply_network
from tiktrue.model.store import BlockStore
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.resources import free_ports
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import (
    NetworkConfig,
    NodeEntry,
    config_path,
    read_config,
)
from tiktrue.security.node_tls import NetworkCredentials, node_identity
from tiktrue.service.control_server import LOSE_REPLIES
from tiktrue.service.local_network import place_blocks

NET = "syncnet"
DOWN = ("offline", "suspect", "dead", "unknown (no control port)")  # states of a node away


def _config(tiny_llama, **changes) -> NetworkConfig:
    order = tiny_llama.manifest.model_chain_order
    base = {
        "network_id": "n1",
        "name": "office",
        "model_id": tiny_llama.model_id,
        "model_chain_order": order,
        "nodes": [NodeEntry(node_id="a1", role="admin", port=7001, blocks=order)],
        "version": 3,
        "updated_at": "2026-01-01T00:00:00+00:00",
    }
    return NetworkConfig.model_validate({**base, **changes})


# --- which config wins (no processes) ------------------------------------------------------


def test_the_higher_version_wins_whichever_arrives_first(tiny_llama, caplog):
    old, new = _config(tiny_llama, version=3), _config(tiny_llama, version=4, name="moved")
    assert handle_config_conflicts(old, new) is new
    assert handle_config_conflicts(new, old) is new
    assert handle_config_conflicts(None, old) is old
    same = _config(tiny_llama, version=3)
    assert handle_config_conflicts(old, same) is old
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_equal_versions_with_different_content_resolve_by_digest_and_warn(tiny_llama, caplog):
    one, two = _config(tiny_llama, name="one"), _config(tiny_llama, name="two")
    expected = one if config_digest(one) < config_digest(two) else two
    alerts = []
    with caplog.at_level(logging.WARNING, logger="tiktrue.config_sync"):
        assert handle_config_conflicts(one, two, alert=alerts.append) is expected
        assert handle_config_conflicts(two, one, alert=alerts.append) is expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("config conflict in network n1" in w for w in warnings)
    assert alerts == warnings
    with pytest.raises(Exception, match="offered for"):
        handle_config_conflicts(one, _config(tiny_llama, network_id="n2"))


def test_a_new_control_port_moves_only_the_port(tiny_llama):
    config = _config(tiny_llama)
    moved = with_control_port(config, "a1", 9100)  # its version: the writer's to number
    assert moved.node("a1").control_port == 9100
    assert moved.model_copy(update={"nodes": config.nodes}) == config
    assert with_control_port(moved, "a1", 9100) is None
    assert with_control_port(config, "not-a-member", 9100) is None


def test_missing_blocks_are_the_absent_and_the_tampered(tiny_llama, tmp_path):
    order = tiny_llama.manifest.model_chain_order
    place_blocks(tiny_llama, tmp_path / "models" / tiny_llama.model_id, order[:3])
    config = _config(tiny_llama)
    assert missing_blocks(tmp_path, config, "a1") == order[3:]
    block = tmp_path / "models" / tiny_llama.model_id / tiny_llama.manifest.blocks[order[1]].file
    data = bytearray(block.read_bytes())
    data[-1] ^= 1
    block.unlink()  # a hard link to the source store: write a new file
    block.write_bytes(bytes(data))
    assert missing_blocks(tmp_path, config, "a1") == [order[1], *order[3:]]
    assert missing_blocks(tmp_path / "empty", config, "a1") == order


# --- real node processes ---------------------------------------------------------------------


class Net:
    def __init__(self, homes, nodes: NodeProcesses) -> None:
        self.homes = homes
        self.admin, self.pc2, self.pc3 = homes
        self.nodes = nodes
        self.ids = [node_identity(h).node_id for h in homes]

    def config(self, home=None) -> NetworkConfig:
        return read_config(config_path(home or self.admin, NET))

    def credentials(self) -> NetworkCredentials:
        return NetworkCredentials.load(self.admin, NET)

    def status(self) -> dict:
        return asyncio.run(network_status(self.admin, NET))

    def push(self, config: NetworkConfig):
        """The broadcast itself (what the admin's writer runs), with a config of the test's
        own making; then the admin's service reloads, as after the writer's commit."""

        async def go():
            report = await broadcast_config_updates(self.admin, config, self.credentials())
            await poke_local_service(self.admin)
            return report

        return asyncio.run(go())

    def renamed(self, name: str, config: NetworkConfig | None = None) -> NetworkConfig:
        config = config or self.config()
        return config.model_copy(update={"name": name, "version": config.version + 1})

    def plan(self, spans: dict[str, int]) -> NetworkConfig:
        return asyncio.run(apply_network(self.admin, NET, overrides=spans))


@pytest.fixture(scope="module")
def net(tiny_llama, tmp_path_factory):
    """admin, pc2, pc3 as real processes; created, joined by token and planned 3/3/2, as
    people do it. Test hooks on: a node loses the replies listed in its LOSE_REPLIES file."""
    base = tmp_path_factory.mktemp("sync")
    homes = [base / name for name in ("admin", "pc2", "pc3")]
    for home in homes:
        home.mkdir()
    import_model_from_store(tiny_llama.root, homes[0] / "models")
    nodes = NodeProcesses(homes, env={"TIKTRUE_TEST_HOOKS": "1"}).start()
    try:
        admin = homes[0]
        host, port = control_address(admin).rsplit(":", 1)
        store = BlockStore(admin / "models" / tiny_llama.model_id)
        create_network(
            admin,
            "Sync",
            store,
            host=host,
            port=free_ports(1, host)[0],  # not the default 7480: other test runs share the PC
            control_port=int(port),
            network_id=NET,
            auto_plan=False,
        )
        for home in homes[1:]:
            service = json.loads(run_file(home).read_text())
            token = create_join_token(admin, NET)
            asyncio.run(join_network(home, control_address(admin), service=service, token=token))
        network = Net(homes, nodes)
        ids = network.ids
        network.plan({ids[0]: 3, ids[1]: 3, ids[2]: 2})
        yield network
    finally:
        nodes.stop()


@pytest.fixture
def running(net):
    """Every node up and on the admin's config (a test before may have stopped one)."""
    net.nodes.start()
    for home in net.homes:
        (home / LOSE_REPLIES).unlink(missing_ok=True)
    _settled(net)
    return net


def _settled(net: Net) -> dict:
    """Until the admin's failover is done with every node it took a span from (the health
    monitor saw a stopped node dead; it re-plans when the node is back), then converged."""

    def done() -> bool:
        taken = set()
        since = net.nodes.started_at[net.admin]  # a restarted admin forgets its failovers
        for event in recent_events(events_path(net.admin), 1000, NET):
            if event["time"] < since:
                continue
            if event["event"] in ("failover", "network_degraded"):
                taken.add(event["node_id"])
            elif event["event"] == "network_restored":
                taken.discard(event["node_id"])
        return not taken

    wait_until(done, "the admin's failover to settle")
    return _wait_converged(net)


def _wait_converged(net: Net, *, serving: set[str] | None = None) -> dict:
    """Until every node is online on the admin's version (and serving, if it has blocks)."""

    def converged():
        status = net.status()
        for node in status["nodes"]:
            if node["state"] in DOWN:
                return None
            if node["version_held"] != status["version"]:
                return None
            if node["blocks"] and node["state"] != "serving":
                return None
        return status

    return wait_until(converged, "every node online on the admin's config version")


def test_a_lost_acknowledgement_is_retried(running):
    net = running
    for home in (net.pc2, net.pc3):  # each node does the work, then its reply is lost
        (home / LOSE_REPLIES).write_text(json.dumps({"config_prepare": 1, "config_commit": 1}))
    new = net.renamed("after lost acks")
    report = net.push(new)
    workers = sorted(net.ids[1:])
    assert sorted(report.committed) == workers and report.complete, report
    assert report.attempts["config_prepare"] == {n: 2 for n in workers}
    assert report.attempts["config_commit"] == {n: 2 for n in workers}
    for home in (net.pc2, net.pc3):
        assert json.loads((home / LOSE_REPLIES).read_text()) == {
            "config_prepare": 0,
            "config_commit": 0,
        }
        assert config_digest(net.config(home)) == config_digest(new)  # signed on the way
    status = net.status()
    assert {n["version_held"] for n in status["nodes"]} == {new.version}, status


def test_a_node_away_during_a_push_pulls_on_return_on_a_new_port(running):
    net = running
    away = net.ids[2]
    net.nodes.stop(net.pc3)
    new = net.renamed("while pc3 was away")
    report = net.push(new)
    assert report.committed == [net.ids[1]] and list(report.pending) == [away], report
    assert net.config(net.pc3).version < new.version
    states = {n["node_id"]: n["state"] for n in net.status()["nodes"]}
    assert states[away] in DOWN

    net.nodes.start(net.pc3)  # --control-port 0: a new port, that the admin must learn
    port = int(control_address(net.pc3).rsplit(":", 1)[1])
    status = _settled(net)
    assert net.config().node(away).control_port == port  # re-announced on its new port
    states = {n["node_id"]: n["state"] for n in status["nodes"]}
    assert states[away] in ("serving", "idle"), status  # idle: the failover moved its span
    # the same config as the admin's: the push it missed, or one the failover made since
    assert config_digest(net.config(net.pc3)) == config_digest(net.config())


def test_a_node_back_after_a_new_plan_drops_its_stale_span_then_serves_again(running, tiny_llama):
    net = running
    away = net.ids[2]
    net.nodes.stop(net.pc3)
    moved = net.plan({net.ids[0]: 4, net.ids[1]: 4})  # the chain without pc3
    assert moved.node(away).blocks == []

    net.nodes.start(net.pc3)
    status = _wait_converged(net)
    states = {n["node_id"]: n["state"] for n in status["nodes"]}
    assert states[away] == "idle", status  # online, serving nothing
    assert json.loads(run_file(net.pc3).read_text())["networks"] == {}
    assert net.config(net.pc3).node(away).blocks == []

    net.plan({net.ids[0]: 3, net.ids[1]: 3, away: 2})  # and back into the chain
    status = _wait_converged(net)
    assert {n["node_id"]: n["state"] for n in status["nodes"]}[away] == "serving"
    ws_url = net.nodes.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"

    async def chat():
        async with websockets.connect(ws_url) as ws:
            body = request(NET, input_ids=[5, 17, 42, 99], temperature=0, max_tokens=8)
            return await ask(ws, body)

    assert token_ids(asyncio.run(chat())) == reference_tokens(tiny_llama, [5, 17, 42, 99], 8)


def test_a_prepare_without_the_blocks_is_refused_and_nothing_is_committed(running, tiny_llama):
    net = running
    config = net.config()
    pc2 = net.ids[1]
    assert "head" not in config.node(pc2).blocks
    head = net.pc2 / "models" / tiny_llama.model_id / tiny_llama.manifest.blocks["head"].file
    head.unlink(missing_ok=True)  # pc2 does not hold the head block
    order = config.model_chain_order
    spans = {net.ids[0]: order[:-1], pc2: ["head"], net.ids[2]: []}
    nodes = [n.model_copy(update={"blocks": spans[n.node_id]}) for n in config.nodes]
    bad = config.model_copy(update={"nodes": nodes, "version": config.version + 1})
    bad = NetworkConfig.model_validate(bad.model_dump())

    with pytest.raises(SyncError) as refused:
        net.push(bad)
    report = refused.value.report
    assert refused.value.code == "prepare_refused"
    assert list(report.refused) == [pc2] and "head" in report.refused[pc2]
    assert report.committed == []
    assert net.config() == config  # the admin kept its config
    status = net.status()
    assert {n["version_held"] for n in status["nodes"]} == {config.version}
    assert all(n["state"] == "serving" for n in status["nodes"] if n["blocks"])

    async def commit_anyway():  # pc3 had prepared it: the abort dropped what it staged
        async with ControlLink.to(config.node(net.ids[2]), net.credentials()) as link:
            await link.call("config_commit", network_id=NET, version=bad.version)

    with pytest.raises(ControlError) as late:
        asyncio.run(commit_anyway())
    assert late.value.code == "not_prepared"


def test_equal_versions_with_different_content_resolve_the_same_on_every_node(running):
    net = running
    config = net.config()
    ca = admin_ca(net.admin, NET)  # signed as the admin signs what it sends
    one, two = (sign_config(net.renamed(name, config), ca) for name in ("one", "two"))
    winner = one if config_digest(one) < config_digest(two) else two
    workers = [config.node(n) for n in net.ids[1:]]

    async def offer(node, config):  # as the admin would, without the broadcast's abort
        async with ControlLink.to(node, net.credentials()) as link:
            try:
                await link.call(
                    "config_prepare", network_id=NET, config=config.model_dump(mode="json")
                )
            except ControlError as exc:
                assert exc.code == "stale_config"
                return
            await link.call("config_commit", network_id=NET, version=config.version)

    async def go():
        await offer(workers[0], one)
        await offer(workers[0], two)
        await offer(workers[1], two)
        await offer(workers[1], one)

    asyncio.run(go())
    for home in (net.pc2, net.pc3):
        assert config_digest(net.config(home)) == config_digest(winner)
        log = (home / "node.log").read_text(errors="replace")
        assert f"config conflict in network {NET}" in log
        events = recent_events(events_path(home), network_id=NET)
        assert "config_conflict" in {e["event"] for e in events}, events
    # the admin moves everyone on with the next version
    report = net.push(net.renamed("settled", winner))
    assert report.complete, report
    _wait_converged(net)


def test_a_node_back_while_the_admin_was_away_finds_it_on_its_new_port(running):
    """Both restart on new control ports; neither's config knows the other's. The node,
    failing to reach the admin where it was, looks for it on the LAN and pulls from there."""
    net = running
    net.nodes.stop(net.pc3)
    net.nodes.stop(net.admin)
    net.nodes.start(net.pc3)  # the admin is away: its pull fails, it keeps trying
    net.nodes.start(net.admin)
    status = _settled(net)
    admin, pc3 = net.config(), net.config(net.pc3)
    assert admin.node(net.ids[0]).control_address == control_address(net.admin)
    assert admin.node(net.ids[2]).control_address == control_address(net.pc3)
    assert config_digest(pc3) == config_digest(admin)
    assert {n["node_id"]: n["state"] for n in status["nodes"]}[net.ids[2]] not in DOWN
