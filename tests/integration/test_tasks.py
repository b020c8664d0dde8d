"""Whitelisted tasks and remote log lines on real node processes: a task on a worker returns
its output and is kept; a task not on the list is refused by the node itself; a worker's
certificate cannot send tasks (and the role table says so for every caller); members read a
node's log lines; a restart task brings the node back."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.security.access_control import (
    CALLERS,
    CONTROL_OPS,
    AccessDenied,
    Caller,
    check_control,
)
from tiktrue.security.node_tls import NetworkCredentials, node_identity

pytestmark = pytest.mark.integration
NET = "testnet"


def cli(home, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "tiktrue", *args],
        env={**os.environ, "TIKTRUE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def control_of(home) -> str:
    return json.loads(run_file(home).read_text())["control"]


async def call(home, target_home, op: str, **fields) -> dict:
    """``op`` on ``target_home``'s node, with ``home``'s certificate of the network."""
    credentials = NetworkCredentials.load(home, NET)
    expected = node_identity(target_home).node_id
    async with ControlLink(
        control_of(target_home), expected_node_id=expected, credentials=credentials
    ) as link:
        return await link.call(op, network_id=NET, **fields)


def test_only_the_admin_and_the_owner_send_tasks_and_members_read_logs():
    """Walk the role table: every caller, every task and log operation."""
    for op in ("task_start", "task_status", "logs"):
        for kind in CALLERS:
            caller = Caller(kind, "n", NET if kind in ("admin", "worker", "backup") else None)
            allowed = {
                "task_start": {"admin", "owner"},
                "task_status": {"admin", "owner"},
                "logs": {"admin", "worker", "backup", "owner"},
            }[op]
            if kind in allowed:
                check_control(op, caller, NET)
            else:
                with pytest.raises(AccessDenied):
                    check_control(op, caller, NET)
        assert op in CONTROL_OPS


def test_a_task_on_a_worker_returns_its_output_and_is_kept(tiny_cluster):
    cluster, homes, config = tiny_cluster
    worker = node_identity(homes[1]).node_id
    done = cli(homes[0], "tasks", "run", worker[:8], "verify_blocks")
    assert "blocks of" in done.stdout and "verified" in done.stdout
    assert "layer_2: ok" in done.stdout  # the worker's own span, checked there
    usage = cli(homes[0], "tasks", "run", worker, "disk_usage", "--network", NET)
    assert "models/" in usage.stdout and "GiB free" in usage.stdout
    kept = cli(homes[0], "tasks", "list").stdout
    assert "verify_blocks" in kept and "disk_usage" in kept
    task_id = kept.split()[0]
    assert "GiB free" in cli(homes[0], "tasks", "show", task_id).stdout
    # in both event logs
    admin_events = (homes[0] / "logs" / "events.jsonl").read_text()
    assert '"event": "task"' in admin_events
    worker_events = (homes[1] / "logs" / "events.jsonl").read_text()
    assert '"task_finished"' in worker_events and '"disk_usage"' in worker_events
    # the log lines of a worker, read by the admin
    lines = cli(homes[0], "tasks", "logs", worker, "--lines", "50").stdout.splitlines()
    assert 0 < len(lines) <= 50
    assert any("tiktrue" in line for line in lines)


def test_a_task_not_on_the_list_is_refused_by_the_node(tiny_cluster):
    cluster, homes, config = tiny_cluster
    with pytest.raises(ControlError) as refused:
        asyncio.run(call(homes[0], homes[2], "task_start", task="shell", args={"cmd": "id"}))
    assert refused.value.code == "task_not_allowed"
    with pytest.raises(ControlError) as bad_args:
        asyncio.run(call(homes[0], homes[2], "task_start", task="disk_usage", args={"x": 1}))
    assert bad_args.value.code == "bad_request"
    done = cli(homes[0], "tasks", "run", node_identity(homes[2]).node_id, "shell", check=False)
    assert done.returncode == 1 and "task_not_allowed" in done.stderr
    events = homes[2] / "logs" / "events.jsonl"
    assert '"task": "shell"' not in (events.read_text() if events.is_file() else "")


def test_a_worker_certificate_cannot_send_tasks_but_reads_logs(tiny_cluster):
    cluster, homes, config = tiny_cluster
    with pytest.raises(ControlError) as refused:
        asyncio.run(call(homes[1], homes[2], "task_start", task="disk_usage", args={}))
    assert refused.value.code == "forbidden"
    lines = asyncio.run(call(homes[1], homes[2], "logs", lines=5))["lines"]
    assert len(lines) <= 5


def test_a_restart_task_brings_the_node_back(tiny_llama, tmp_path):
    from tiktrue.service.local_network import LocalCluster, prepare_local_network

    homes, config = prepare_local_network(tmp_path, tiny_llama, nodes=2, network_id=NET)
    with LocalCluster(homes, kv_budget_mb=16, gateway=False) as cluster:
        before = json.loads(run_file(homes[1]).read_text())
        worker = node_identity(homes[1]).node_id
        asked = time.time()
        done = cli(homes[0], "tasks", "run", worker, "restart_node")
        assert "restarts now" in done.stdout
        deadline = time.monotonic() + 120  # a ceiling for a busy machine
        path = run_file(homes[1])
        while not (path.is_file() and path.stat().st_mtime > asked):  # started again
            if time.monotonic() > deadline:
                raise AssertionError("the node did not come back")
            time.sleep(0.3)
        info = json.loads(path.read_text())
        assert cluster.processes[1].poll() is None and info["pid"] == before["pid"]
        # it answers on its control channel again
        usage = cli(homes[0], "tasks", "run", worker, "disk_usage")
        assert "GiB free" in usage.stdout
        assert read_config(config_path(homes[1], NET)).version >= config.version
