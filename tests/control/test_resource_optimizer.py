"""The rebalancing's arithmetic, on history rows as ``HistoryStore`` keeps them: which hop
slows the chain, the speeds it measures, the plan the planner makes with them and its gain;
figures of an older plan and too few steps are not a measurement."""

from __future__ import annotations

import pytest

from tests.control.test_planner import GB, MB, make_model, node
from tiktrue.control.resource_optimizer import (
    MIN_STEPS,
    NotEnoughHistory,
    analyze_workload_patterns,
    dynamic_load_balancing,
)
from tiktrue.protocol.network_config import NetworkConfig, NodeEntry

MODEL = make_model(layers=10, layer_bytes=100 * MB, embed=50 * MB, head=50 * MB)
ORDER = MODEL.chain_order  # embed, layer_0..layer_9, head


def config(spans: dict[str, list[str]], version: int = 3, backups=None) -> NetworkConfig:
    nodes = [
        NodeEntry(node_id=n, role="admin" if i == 0 else "worker", port=7000 + i, blocks=b)
        for i, (n, b) in enumerate(spans.items())
    ]
    for k, (n, b) in enumerate((backups or {}).items()):
        nodes.append(NodeEntry(node_id=n, role="backup", port=7100 + k, blocks=b))
    return NetworkConfig(
        network_id="net", model_id="m", model_chain_order=ORDER, nodes=nodes, version=version
    )


def hop_row(node_id, steps, compute_ms, wait_ms=0.0, link_ms=None, version=3, network="net"):
    return {
        "network_id": network,
        "node_id": node_id,
        "version": version,
        "steps": steps,
        "compute_ms": compute_ms * steps,
        "wait_ms": wait_ms * steps,
        "link_ms": (link_ms or 0.0) * steps,
        "link_samples": steps if link_ms is not None else 0,
    }


def usage_row(steps, ms_per_token, transit_ms=0.0, start=7 * 3600):
    return {
        "network_id": "net",
        "start": start,
        "answers": 2,
        "completion_tokens": steps + 2,
        "decode_steps": steps,
        "decode_s": steps * ms_per_token / 1000,
        "transit_ms": transit_ms * steps,
    }


EVEN = {
    "a": ORDER[:5],  # embed, layer_0..layer_3: 400 MB of compute
    "b": ORDER[5:9],  # layer_4..layer_7: 400 MB
    "c": ORDER[9:],  # layer_8, layer_9, head: 250 MB
}


def analysis(rows, cfg=None):
    cfg = cfg or config(EVEN)
    usage = [usage_row(100, 60.0, transit_ms=3.0)]
    return analyze_workload_patterns(cfg, rows, [], usage, since=0.0, until=1.0)


def test_the_slow_pc_is_named_with_what_slows_it():
    found = analysis(
        [
            hop_row("a", 100, 4.0, wait_ms=0.5, link_ms=1.0),
            hop_row("b", 100, 40.0, wait_ms=2.0, link_ms=1.0),  # ten times a's per byte
            hop_row("c", 100, 2.5, link_ms=1.0),
            hop_row("b", 500, 1.0, version=2),  # an older plan: not this one's figures
            hop_row("a", 100, 99.0, network="other"),
        ]
    )
    assert [h.node_id for h in found.hops] == ["a", "b", "c"]
    b = found.hops[1]
    assert (b.steps, b.compute_ms, b.wait_ms, b.link_ms) == (100, 40.0, 2.0, 1.0)
    assert found.slowest.node_id == "b"
    assert b.share == pytest.approx(42.5 / (5.0 + 42.5 + 3.0))
    assert found.ms_per_token == pytest.approx(60.0) and found.transit_ms == pytest.approx(3.0)
    assert found.busiest_hour == 7
    assert "slowest: b" in found.describe() and "mostly compute" in found.describe()


def test_the_plan_with_measured_speeds_moves_layers_off_the_slow_pc_and_says_the_gain():
    found = analysis(
        [hop_row("a", 100, 4.0), hop_row("b", 100, 40.0), hop_row("c", 100, 2.5)]
    )  # a and c: 100 MB/ms; b: 10 MB/ms
    probes = [node(n, 10 * GB, speed=1 * MB) for n in "abc"]  # the probe says all are slow
    rebalance = dynamic_load_balancing(found, config(EVEN), MODEL, probes, admin_id="a")
    assert rebalance.measured == {"a", "b", "c"}
    assert rebalance.speeds["b"] == pytest.approx(10 * MB)
    assert rebalance.current_ms == pytest.approx(4.0 + 40.0 + 2.5)
    planned = rebalance.plan.assignments
    assert len(planned.get("b", [])) < len(EVEN["b"])  # the slow PC keeps fewer layers
    assert rebalance.planned_ms < rebalance.current_ms
    assert rebalance.gain_ratio > 0.5 and rebalance.worth_it
    assert "b" in rebalance.changes and "faster" in rebalance.verdict()


def test_a_chain_that_is_already_balanced_is_left_alone():
    found = analysis(
        [hop_row("a", 100, 4.0), hop_row("b", 100, 4.0), hop_row("c", 100, 2.5)]
    )  # every PC 100 MB/ms: the even split is the fastest
    probes = [node(n, 10 * GB) for n in "abc"]
    rebalance = dynamic_load_balancing(found, config(EVEN), MODEL, probes, admin_id="a")
    assert not rebalance.worth_it
    assert rebalance.gain_ms == pytest.approx(0.0, abs=1e-6) or not rebalance.changes


def test_too_few_steps_are_no_measurement():
    found = analysis([hop_row(n, MIN_STEPS - 1, 5.0) for n in "abc"])
    probes = [node(n, 10 * GB) for n in "abc"]
    with pytest.raises(NotEnoughHistory, match="decode steps"):
        dynamic_load_balancing(found, config(EVEN), MODEL, probes, admin_id="a")


def test_a_backup_that_served_a_replica_chain_is_measured_too():
    cfg = config(EVEN, backups={"d": ORDER[5:]})
    found = analysis([hop_row("a", 100, 4.0), hop_row("d", 50, 3.0)], cfg)
    assert [h.node_id for h in found.hops] == ["a", "b", "c", "d"]
    assert found.hops[3].steps == 50
    idle = analysis([hop_row("a", 100, 4.0)], cfg)
    assert "d" not in [h.node_id for h in idle.hops]  # it served nothing: not a hop
