"""The health state machine (fake clock, no sleeping) and the heartbeat transport's failures."""

from __future__ import annotations

import asyncio

import pytest

from tiktrue.control.health_monitor import (
    DEAD,
    ONLINE,
    SUSPECT,
    UNKNOWN,
    BeatFailed,
    ControlBeats,
    HealthMonitor,
    event_logger,
)
from tiktrue.monitoring.monitoring_system import EventLog
from tiktrue.node.resources import free_ports
from tiktrue.protocol.network_config import NetworkConfig, NodeEntry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_config(*node_ids: str, heartbeat_s: float = 1.0, dead_after_s: float = 4.0):
    ports = free_ports(2 * len(node_ids))
    return NetworkConfig(
        network_id="net",
        model_id="m",
        model_chain_order=["embed", "head"],
        heartbeat_s=heartbeat_s,
        dead_after_s=dead_after_s,
        nodes=[
            NodeEntry(
                node_id=node_id,
                role="admin" if i == 0 else "worker",
                port=ports[2 * i],
                control_port=ports[2 * i + 1],
            )
            for i, node_id in enumerate(node_ids)
        ],
    )


def monitored(*node_ids: str, beat=None, **settings):
    clock = FakeClock()
    monitor = HealthMonitor(make_config(*node_ids, **settings), beat=beat, clock=clock)
    changes = []
    monitor.add_listener(lambda net, node, old, new, info: changes.append((node, old, new)))
    return monitor, clock, changes


def test_online_suspect_dead_and_back():
    monitor, clock, changes = monitored("admin", "w1")
    assert monitor.state("w1") == UNKNOWN
    monitor.record_beat("w1", 1.5, {"cpu_percent": 3.0})
    assert monitor.state("w1") == ONLINE
    clock.now += 1.0
    monitor.record_miss("w1", "no answer in 1.3 s")
    assert monitor.state("w1") == SUSPECT
    clock.now += 2.0  # 3 s since the last good beat: still only suspect
    monitor.record_miss("w1", "no answer in 1.3 s")
    assert monitor.state("w1") == SUSPECT
    clock.now += 1.0  # 4 s: dead_after_s
    monitor.check()
    assert monitor.state("w1") == DEAD
    monitor.record_miss("w1", "refused")  # stays dead, no new change
    clock.now += 30.0
    monitor.record_beat("w1", 2.0, {})
    assert monitor.state("w1") == ONLINE
    changes = [c for c in changes if c[0] == "w1"]  # the admin, never beaten, died too
    assert changes == [
        ("w1", UNKNOWN, ONLINE),
        ("w1", ONLINE, SUSPECT),
        ("w1", SUSPECT, DEAD),
        ("w1", DEAD, ONLINE),
    ]
    history = monitor.snapshot()["nodes"]["w1"]["history"]
    assert [(h["from"], h["to"]) for h in history] == [c[1:] for c in changes]
    assert history[2]["why"] == "no heartbeat for 4.0 s"
    assert history[2]["last_beat_s"] == 4.0


def test_a_hung_node_turns_suspect_then_dead_while_its_beat_still_waits():
    """No beat ends (the node is stopped): the clock alone moves it along."""
    monitor, clock, changes = monitored("admin", "w1")
    monitor.record_beat("w1", 1.0, {})
    clock.now += 1.0 + monitor.beat_timeout_s - 0.01
    monitor.check()
    assert monitor.state("w1") == ONLINE
    clock.now += 0.02
    monitor.check()
    assert monitor.state("w1") == SUSPECT
    clock.now = 1000.0 + 4.0
    monitor.check()
    assert monitor.state("w1") == DEAD
    assert [c[2] for c in changes if c[0] == "w1"] == [ONLINE, SUSPECT, DEAD]


def test_a_node_never_heard_is_dead_after_dead_after_s_from_the_start():
    monitor, clock, changes = monitored("admin", "w1", heartbeat_s=0.5, dead_after_s=2.0)
    monitor.record_beat("admin", 0.1, {})
    clock.now += 1.9
    monitor.check()
    assert monitor.state("w1") == UNKNOWN
    clock.now += 0.1
    monitor.check()
    assert (monitor.state("admin"), monitor.state("w1")) == (DEAD, DEAD)
    assert ("w1", UNKNOWN, DEAD) in changes
    clock.now += 10
    late = make_config("admin", "w1", "late", heartbeat_s=0.5, dead_after_s=2.0)
    monitor.update_config(late)  # joined now: counted from now
    monitor.check()
    assert monitor.state("late") == UNKNOWN
    clock.now += 2.0
    monitor.check()
    assert monitor.state("late") == DEAD


def test_no_verdicts_while_the_admin_itself_was_held_up():
    """After the admin's own loop stalled, its silence is not the nodes' fault."""
    monitor, clock, _ = monitored("admin", "w1")
    monitor.record_beat("w1", 1.0, {})
    clock.now += 6.0
    monitor.hold_verdicts(2.0)
    monitor.check()
    assert monitor.state("w1") == SUSPECT
    monitor.record_beat("w1", 1.0, {})  # the beat that was held up comes in
    assert monitor.state("w1") == ONLINE
    clock.now += 6.0
    monitor.check()
    assert monitor.state("w1") == DEAD


def test_snapshot_reports_last_beat_rtt_and_stats():
    monitor, clock, _ = monitored("admin", "w1")
    monitor.record_beat("w1", 2.34567, {"sessions": 2, "kv_pages_used": 5})
    clock.now += 0.5
    node = monitor.snapshot()["nodes"]["w1"]
    assert node["state"] == ONLINE and node["last_beat_s"] == 0.5 and node["rtt_ms"] == 2.346
    assert node["stats"] == {"sessions": 2, "kv_pages_used": 5} and node["missed"] == 0
    assert monitor.snapshot()["nodes"]["admin"]["last_beat_s"] is None


def test_config_updates_add_and_drop_nodes():
    monitor, _, _ = monitored("admin", "w1")
    monitor.update_config(make_config("admin", "w2"))
    assert set(monitor.nodes) == {"admin", "w2"}
    monitor.record_beat("w1", 1.0, {})  # a late answer from a node that left: ignored
    assert "w1" not in monitor.nodes


def test_a_failing_listener_does_not_stop_the_others():
    monitor, _, changes = monitored("admin", "w1")

    def broken(*args):
        raise RuntimeError("listener bug")

    monitor.listeners.insert(0, broken)
    monitor.record_beat("w1", 1.0, {})
    assert changes == [("w1", UNKNOWN, ONLINE)]


def test_suspect_now_probes_at_once():
    outcomes = {
        "refused": BeatFailed("connection refused", refused=True),
        "hung": BeatFailed("no answer in 1.3 s"),
    }
    probes = []

    async def beat(node, timeout, fresh):
        probes.append((node.node_id, fresh))
        if node.node_id in outcomes:
            raise outcomes[node.node_id]
        return 1.0, {"sessions": 0}

    async def run():
        monitor, clock, changes = monitored("admin", "refused", "hung", "fine", beat=beat)
        for node_id in ("refused", "hung", "fine"):
            monitor.record_beat(node_id, 1.0, {})
            monitor.suspect_now(node_id, "the gateway lost its link")
            assert monitor.state(node_id) == SUSPECT
        await asyncio.gather(*monitor._probes.values())
        return monitor, clock, changes

    monitor, clock, changes = asyncio.run(run())
    assert sorted(probes) == [("fine", True), ("hung", True), ("refused", True)]
    assert monitor.state("refused") == DEAD
    why = monitor.nodes["refused"].history[-1]["why"]
    assert why.startswith("refused the connection"), why
    assert monitor.state("fine") == ONLINE
    assert ("fine", SUSPECT, ONLINE) in changes
    # a probe not answered in time is a missed beat: a busy PC is not dead for one slow answer
    assert monitor.state("hung") == SUSPECT and monitor.nodes["hung"].missed == 1
    clock.now += monitor.config.dead_after_s  # the clock decides, as for any missed beat
    monitor.check()
    assert monitor.state("hung") == DEAD


def test_the_loop_beats_every_node_and_finds_the_one_that_fails():
    """The real loop with a fake transport: w1 answers, w2 never. The monitor's own clock
    moves only when the test moves it, half a heartbeat after each of w1's beats, so the
    verdicts follow that clock and never how fast this machine runs the loop (a loaded
    machine delays w1's beats in real time, never in the monitor's)."""

    async def beat(node, timeout, fresh):
        if node.node_id == "w2":
            await asyncio.sleep(timeout)  # it never answers: each beat times out
            raise BeatFailed(f"no answer in {timeout:.2f} s")
        return 0.5, {"node": node.node_id}

    async def run():
        clock = FakeClock()
        config = make_config("admin", "w1", "w2", heartbeat_s=0.2, dead_after_s=0.8)
        monitor = HealthMonitor(config, beat=beat, clock=clock)
        dead, w1_beat = asyncio.Event(), asyncio.Event()
        seen = []

        def listen(net, node, old, new, info):
            seen.append((node, new))
            if node == "w2" and new == DEAD:
                dead.set()

        def beaten(net, node, stats):
            if node == "w1":
                w1_beat.set()

        monitor.add_listener(listen)
        monitor.add_beat_listener(beaten)
        monitor.start()
        try:
            for _ in range(1000):  # dead after 8 steps, more if the loop held verdicts back
                if dead.is_set():
                    break
                w1_beat.clear()
                await asyncio.wait_for(w1_beat.wait(), 60)
                clock.now += config.heartbeat_s / 2
        finally:
            await monitor.stop()
        return monitor, seen

    monitor, seen = asyncio.run(run())
    assert monitor.state("w1") == ONLINE and monitor.nodes["w1"].stats == {"node": "w1"}
    w2 = [new for node, new in seen if node == "w2"]
    assert w2[-1] == DEAD and SUSPECT in w2 and ONLINE not in w2
    assert ("w1", SUSPECT) not in seen and ("w1", DEAD) not in seen


def test_changes_go_to_the_event_log(tmp_path):
    events = EventLog(tmp_path)
    monitor, clock, _ = monitored("admin", "w1")
    monitor.add_listener(event_logger(events))
    monitor.record_beat("w1", 1.0, {})
    clock.now += 5
    monitor.check()
    events.close()
    logged = [(e["event"], e["level"], e["node_id"], e["previous"]) for e in events.recent()]
    assert ("node_online", "info", "w1", UNKNOWN) in logged
    assert logged[-1] == ("node_dead", "error", "w1", ONLINE)
    assert all(e["network_id"] == "net" for e in events.recent())


# --- the transport: real sockets on 127.0.0.1 --------------------------------------------


def test_a_closed_port_is_refused():
    config = make_config("admin", "w1")
    beats = ControlBeats("net", None)
    with pytest.raises(BeatFailed) as failed:
        asyncio.run(beats.beat(config.node("w1"), 5.0))
    assert failed.value.refused, failed.value


def test_a_process_that_accepts_but_never_answers_times_out():
    """What a SIGSTOPped node looks like: the kernel accepts, nobody speaks TLS."""

    async def run():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        node = NodeEntry(node_id="w1", port=port, control_port=port)
        try:
            await ControlBeats("net", None).beat(node, 0.5)
        finally:
            server.close()

    with pytest.raises(BeatFailed) as failed:
        asyncio.run(run())
    assert not failed.value.refused and "no answer in 0.5 s" in str(failed.value)


def test_settings_have_defaults_and_are_checked():
    config = make_config("admin")
    assert (config.heartbeat_s, config.dead_after_s, config.webhook_url) == (1.0, 4.0, None)
    with pytest.raises(ValueError, match="must be longer than heartbeat_s"):
        make_config("admin", heartbeat_s=2.0, dead_after_s=2.0)
    with pytest.raises(ValueError, match="http"):
        NetworkConfig.model_validate({**config.model_dump(), "webhook_url": "ftp://x"})


def test_a_node_the_data_plane_reports_is_dead_after_three_silent_beats():
    """A step through the chain stalls: every node of it is reported and probed. One that
    stays silent for three beats is dead (a pulled cable is found in about a second); one
    that answers its next beat (only busy: its loop never runs the model) stays online, and
    its report is forgotten."""

    async def go():
        monitor, clock, changes = monitored("admin", "busy", "silent", heartbeat_s=0.25)
        for node in ("busy", "silent"):
            monitor.record_beat(node, 1.0, {})
        monitor._probe = lambda node_id: asyncio.sleep(
            0
        )  # the probes' transport is not tested here
        clock.now += 0.25
        for node in ("busy", "silent"):
            monitor.report(node, "a step waited 0.5 s for the chain")
        assert monitor.state("busy") == monitor.state("silent") == ONLINE  # only probed
        clock.now += 0.25
        monitor.record_beat("busy", 1.0, {})  # it answers: report forgotten
        clock.now += 0.30  # 0.80 s since the silent one's last beat: three beats of 0.25 s
        monitor.check()
        assert monitor.state("silent") == DEAD
        assert monitor.state("busy") == ONLINE
        clock.now += 1.5  # the busy one silent again, not reported: suspect, dead only at 4 s
        monitor.check()
        assert monitor.state("busy") == SUSPECT
        return changes

    changes = asyncio.run(go())
    assert ("silent", ONLINE, DEAD) in changes
    assert [c for c in changes if c[0] == "busy"] == [
        ("busy", UNKNOWN, ONLINE),
        ("busy", ONLINE, SUSPECT),
    ]
