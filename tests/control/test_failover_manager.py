"""The failover decisions without processes: which backup takes over which spans, where the
planner holds backups back, and how failovers meet the health monitor's verdicts."""

from __future__ import annotations

import asyncio

import pytest

from tests.control.test_health_monitor import monitored
from tests.control.test_planner import MB, make_model, node
from tiktrue.control import failover_manager
from tiktrue.control.config_sync import SyncError
from tiktrue.control.failover_manager import FailoverManager, activate_backup_worker
from tiktrue.control.health_monitor import DEAD, ONLINE
from tiktrue.control.planner import plan_with_backups
from tiktrue.protocol.network_config import NetworkConfig, NodeEntry

ORDER = ["embed", "layer_0", "layer_1", "layer_2", "layer_3", "head"]


def _config(backup_blocks: list[str] | None) -> NetworkConfig:
    nodes = [
        NodeEntry(node_id="admin", role="admin", port=7001, blocks=["embed", "layer_0"]),
        NodeEntry(node_id="w1", port=7002, blocks=["layer_1", "layer_2"]),
        NodeEntry(node_id="w2", port=7003, blocks=["layer_3", "head"]),
    ]
    if backup_blocks is not None:
        nodes.append(NodeEntry(node_id="b", role="backup", port=7004, blocks=backup_blocks))
    return NetworkConfig(network_id="net", model_id="m", model_chain_order=ORDER, nodes=nodes)


@pytest.mark.parametrize("lost", ["w1", "w2"])
def test_a_backup_of_both_workers_takes_both_spans_over(lost):
    config = _config(["layer_1", "layer_2", "layer_3", "head"])
    new = activate_backup_worker(config, {lost})
    assert new is not None and new.version == config.version  # the writer numbers it
    assert [(n.node_id, n.blocks) for n in new.chain()] == [
        ("admin", ["embed", "layer_0"]),
        ("b", ["layer_1", "layer_2", "layer_3", "head"]),
    ]
    # the nodes it covers stand by with their blocks (a returning one can serve again)
    assert {n.node_id: n.role for n in new.nodes} == {
        "admin": "admin",
        "w1": "backup",
        "w2": "backup",
        "b": "worker",
    }


def test_a_backup_of_one_span_covers_only_that_span():
    config = _config(["layer_3", "head"])
    assert activate_backup_worker(config, {"w1"}) is None
    new = activate_backup_worker(config, {"w2"})
    assert [n.node_id for n in new.chain()] == ["admin", "w1", "b"]


@pytest.mark.parametrize(
    "replica",
    [
        ["layer_2", "layer_3", "head"],  # not a run of whole spans: the chain would break
        ["embed", "layer_0", "layer_1", "layer_2"],  # would cover the admin's span
    ],
)
def test_a_replica_that_does_not_match_whole_spans_is_not_used(replica):
    assert activate_backup_worker(_config(replica), {"w1"}) is None


def test_no_backup_for_a_lost_backup_or_a_node_outside_the_chain():
    config = _config(["layer_1", "layer_2", "layer_3", "head"])
    assert activate_backup_worker(config, {"b"}) is None
    assert activate_backup_worker(config, {"w1", "b"}) is None  # the backup is lost too


def test_the_planner_holds_back_the_largest_node_as_backup_of_the_longest_run():
    model = make_model(layers=6, layer_bytes=100 * MB, embed=50 * MB, head=50 * MB)
    small = [node(f"n{i}", 330 * MB) for i in range(3)]
    large = node("big", 700 * MB)
    plan = plan_with_backups(model, [*small, large], 1, keep_first="n0")
    assert "big" not in plan.assignments and len(plan.assignments) == 3
    workers = [b for n, b in plan.assignments.items() if n != "n0"]
    assert plan.backups == {"big": [b for blocks in workers for b in blocks]}
    assert "backup of" in plan.describe()


def test_no_room_for_a_backup_is_said_and_the_chain_is_planned_anyway():
    model = make_model(layers=6, layer_bytes=100 * MB, embed=50 * MB, head=50 * MB)
    nodes = [node(f"n{i}", 330 * MB) for i in range(3)]
    plan = plan_with_backups(model, nodes, 1, keep_first="n0")
    assert plan.backups == {} and len(plan.assignments) == 3
    assert plan.notes == ["the chain needs every other node"]
    assert "no backup" in plan.describe()


# --- the health monitor's verdicts against a failover in progress (fake clock, fake plans) --
#
# The monitor (fake clock, no I/O) drives a FailoverManager wired as the node service wires it
# (``watch``); planning and pushing are replaced by fakes that wait on a gate, so a failover
# can be held "in progress" while beats come in: the interleavings a busy PC produces.


class FakePlans:
    """Stands in for ``apply_network`` (each apply waits for ``gate``, may fail, and makes the
    next config version) and for the network's writer (a change applied to the config)."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.gate = asyncio.Event()
        self.gate.set()
        self.applied: list[set[str]] = []  # the nodes left out of each applied plan
        self.failures: list[Exception] = []  # raised by the next applies, in order

    def load(self, data_dir, network_id):
        return self.config, None

    async def apply_network(self, data_dir, network_id, *, lost=frozenset(), **_):
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.applied.append(set(lost))
        self.config = self.config.model_copy(update={"version": self.config.version + 1})
        return self.config

    async def commit(self, network_id, change, **_):  # the writer
        new = change.apply(self.config)
        if new is not None:
            self.config = new.model_copy(update={"version": self.config.version + 1})
        return new and self.config


@pytest.fixture
def failover(monkeypatch, tmp_path):
    """(monitor, clock, manager, plans, events) for nodes admin, w1, w2 (no backup)."""
    monitor, clock, _ = monitored("admin", "w1", "w2")
    config = monitor.config.model_copy(
        update={
            "model_chain_order": ORDER,
            "nodes": [
                n.model_copy(update={"blocks": blocks})
                for n, blocks in zip(
                    monitor.config.nodes, (ORDER[:2], ORDER[2:4], ORDER[4:]), strict=True
                )
            ],
        }
    )
    monitor.update_config(config)
    plans = FakePlans(config)
    for name in ("load", "apply_network"):
        monkeypatch.setattr(failover_manager, name, getattr(plans, name))
    events = []
    manager = FailoverManager(
        tmp_path,
        plans,
        event=lambda name, **fields: events.append((name, fields["node_id"])),
        clock=clock,
    )
    manager.watch(monitor)
    for node_id in ("admin", "w1", "w2"):
        monitor.record_beat(node_id, 1.0, {})
    return monitor, clock, manager, plans, events


async def until(condition, what: str) -> None:
    """Let the manager's tasks run until ``condition()`` (a ceiling for a busy machine)."""
    deadline = asyncio.get_running_loop().time() + 60
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def dies(monitor, clock, node_id: str) -> None:
    """``node_id`` misses beats for ``dead_after_s`` while the others answer: dead."""
    clock.now += monitor.config.dead_after_s
    for other in monitor.nodes:
        if other != node_id and monitor.state(other) != DEAD:
            monitor.record_beat(other, 1.0, {})
    monitor.check()
    assert monitor.state(node_id) == DEAD


def test_a_node_back_before_its_failover_began_is_not_taken_over(failover):
    """The run that hung the config-sync tests: w1 is declared dead while the failover of w2
    holds the network, and answers again before its own failover begins. It must not be
    failed over (and then never planned back in, since its 'online' had passed)."""
    monitor, clock, manager, plans, events = failover

    async def run():
        plans.gate.clear()  # w2's failover is in progress...
        dies(monitor, clock, "w2")
        await until(lambda: "w2" in manager.state("net").lost, "w2's failover to begin")
        dies(monitor, clock, "w1")  # ...when w1 misses its verdict by a fraction of a second
        clock.now += 0.15
        monitor.record_beat("w1", 1.0, {})
        plans.gate.set()
        await until(lambda: not manager._tasks, "the failovers to end")

    asyncio.run(run())
    assert events == [("failover", "w2")]
    assert manager.state("net").lost == {"w2"} and plans.applied == [{"w2"}]


def test_a_node_back_while_its_failover_runs_is_planned_back_in(failover):
    monitor, clock, manager, plans, events = failover

    async def run():
        plans.gate.clear()
        dies(monitor, clock, "w1")
        await until(lambda: "w1" in manager.state("net").lost, "w1's failover to begin")
        monitor.record_beat("w1", 1.0, {})  # back while the failover pushes
        plans.gate.set()
        await until(lambda: ("network_restored", "w1") in events, "w1 planned back in")
        await until(lambda: not manager._tasks, "the manager to be idle")

    asyncio.run(run())
    assert events == [("failover", "w1"), ("network_restored", "w1")]
    assert plans.applied == [{"w1"}, set()] and not manager.state("net").lost


def test_a_failed_return_is_tried_again_at_a_later_beat(failover):
    """The re-plan with a returning node can fail (a concurrent config change made the push
    stale, a node away): the node stays lost, and a later beat plans it back in."""
    monitor, clock, manager, plans, events = failover

    async def run():
        dies(monitor, clock, "w1")
        await until(lambda: ("failover", "w1") in events, "w1's failover")
        plans.failures.append(SyncError("prepare_refused", "w2: stale_config"))
        monitor.record_beat("w1", 1.0, {})
        await until(lambda: not manager._tasks, "the first return to fail")
        assert "w1" in manager.state("net").lost
        monitor.record_beat("w1", 1.0, {})  # too soon: no new attempt
        assert not manager._tasks
        clock.now += failover_manager.RETRY_BACK_S
        monitor.record_beat("w1", 1.0, {})
        await until(lambda: ("network_restored", "w1") in events, "w1 planned back in")

    asyncio.run(run())
    assert not manager.state("net").lost and plans.applied == [{"w1"}, set()]


def test_a_node_lost_by_a_broken_chain_while_its_beats_go_on_is_planned_back_in(failover):
    """A gateway's broken chain makes the admin ping its nodes; one too slow to answer is lost
    though the monitor, beating it, never saw it go: its next beat plans it back in."""
    monitor, clock, manager, plans, events = failover

    async def run():
        await manager.node_lost("net", "w1", "a step to w1 failed")
        assert monitor.state("w1") == ONLINE
        clock.now += monitor.config.heartbeat_s
        monitor.record_beat("w1", 1.0, {})
        await until(lambda: ("network_restored", "w1") in events, "w1 planned back in")

    asyncio.run(run())
    assert events == [("failover", "w1"), ("network_restored", "w1")]
