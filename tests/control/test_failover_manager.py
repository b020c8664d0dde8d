"""The failover decisions without processes: which backup takes over which spans, and where
the planner holds backups back."""

from __future__ import annotations

import pytest

from tests.control.test_planner import MB, make_model, node
from tiktrue.control.failover_manager import activate_backup_worker
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
    assert new is not None and new.version == config.version + 1
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
