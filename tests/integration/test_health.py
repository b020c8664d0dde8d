"""The admin's health monitor with real node processes: a stopped (SIGSTOP) worker turns
suspect then dead and comes back online on SIGCONT; a killed one turns dead; every change is
in the admin's event log in order and reaches the network's webhook."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import websockets

from tests.helpers.cluster import ask, request, token_ids
from tests.helpers.webhook import webhook_receiver
from tests.integration.test_chain import client_ws_url
from tiktrue.control.local_service import poke_local_service
from tiktrue.control.network_admin import network_status, node_report
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.paths import HOME_ENV, run_file
from tiktrue.protocol.network_config import NetworkConfig, write_config
from tiktrue.security.node_tls import NetworkCredentials

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP/SIGCONT are POSIX signals"),
]
NET = "testnet"


def wait_for(check, what: str, timeout: float = 120.0):
    """Poll ``check`` until it returns something true; fail after a generous ceiling."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def monitored_config(homes, config: NetworkConfig, webhook: str) -> NetworkConfig:
    """The tiny cluster's nodes listen on any control port; the admin needs them in the
    config to beat them. A new version with the ports and the webhook, to every node."""
    ports = [int(json.loads(run_file(h).read_text())["control"].rsplit(":", 1)[1]) for h in homes]
    new = NetworkConfig.model_validate(
        {
            **config.model_dump(),
            "version": config.version + 1,
            "webhook_url": webhook,
            "nodes": [
                {**n.model_dump(), "control_port": port}
                for n, port in zip(config.nodes, ports, strict=True)
            ],
        }
    )
    for home in homes:
        write_config(home, new)
        assert asyncio.run(poke_local_service(home))
    return new


def health(admin) -> dict[str, str]:
    status = asyncio.run(network_status(admin, NET))
    assert status["monitored"], status
    return {n["node_id"]: n for n in status["nodes"]}


def states(admin) -> dict[str, str]:
    return {node_id: n["health"] for node_id, n in health(admin).items()}


def test_stopped_and_killed_workers_are_found_and_logged(own_tiny_cluster):
    cluster, homes, config = own_tiny_cluster
    admin = homes[0]
    with webhook_receiver() as (url, received):
        config = monitored_config(homes, config, url)
        ids = [n.node_id for n in config.nodes]
        _, stopped, killed = ids
        wait_for(lambda: set(states(admin).values()) == {"online"}, "all nodes online")

        nodes = health(admin)
        beat = nodes[stopped]
        assert beat["last_beat_s"] is not None and beat["rtt_ms"] > 0, beat
        for key in ("cpu_percent", "ram_free_bytes", "rss_bytes", "sessions", "kv_pages_total"):
            assert key in beat["stats"], beat["stats"]
        assert "link_rtt_ms" in nodes[ids[0]]["stats"]
        # heartbeats both ways: the worker noted the admin's beat
        credentials = NetworkCredentials.load(admin, NET)
        report = asyncio.run(node_report(config.node(stopped), credentials))
        assert report["networks"][NET]["last_admin_beat"] is not None, report

        process = cluster.processes[1]
        os.kill(process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: states(admin)[stopped] == "dead", "the stopped worker dead")
        finally:
            os.kill(process.pid, signal.SIGCONT)
        wait_for(lambda: states(admin)[stopped] == "online", "the worker online after SIGCONT")

        # an answer opens the chain's links; the one into the killed node will drop
        assert token_ids(asyncio.run(answer(cluster)))
        cluster.processes[2].kill()
        cluster.processes[2].wait()
        wait_for(lambda: states(admin)[killed] == "dead", "the killed worker dead")
        assert states(admin)[ids[0]] == "online"

        posted = []
        wait_for(
            lambda: (
                posted.extend(_drain(received))
                or any(p["event"] == "node_dead" and p["node_id"] == killed for p in posted)
            ),
            "the webhook told of the killed node",
        )

    log = recent_events(events_path(admin), 1000, NET)
    # its health's path; a failover may come between dead and online (it was dead long
    # enough to be planned out, and is planned back in when it answers again)
    health_events = {"node_online", "node_suspect", "node_dead"}
    path = [e["event"] for e in log if e["node_id"] == stopped and e["event"] in health_events]
    assert path[:4] == ["node_online", "node_suspect", "node_dead", "node_online"], path
    died = [e for e in log if e["node_id"] == killed and e["event"] in health_events]
    assert died[-1]["event"] == "node_dead", died  # (a failover of it may follow)
    # the node before it lost its link and told the admin, whose probe was refused; or, when
    # the failover after the stop had already planned it out of the chain, no beat came
    assert died[-1]["why"].startswith(("refused the connection", "no heartbeat")), died
    assert [e["time"] for e in log] == sorted(e["time"] for e in log)
    assert all(p["network_id"] == NET for p in posted)

    cli = subprocess.run(
        [sys.executable, "-m", "tiktrue", "network", "events", NET, "--json"],
        env={**os.environ, HOME_ENV: str(admin)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    printed = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [e["event"] for e in printed] == [e["event"] for e in log][-len(printed) :]
    status = subprocess.run(
        [sys.executable, "-m", "tiktrue", "network", "status", NET],
        env={**os.environ, HOME_ENV: str(admin)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    line = next(row for row in status.stdout.splitlines() if killed in row)
    assert "dead, beat" in line, status.stdout


async def answer(cluster, max_tokens: int = 3) -> list[dict]:
    async with websockets.connect(client_ws_url(cluster)) as ws:
        body = request(NET, input_ids=[5, 17, 42], temperature=0, max_tokens=max_tokens)
        return await ask(ws, body)


def _drain(received) -> list[dict]:
    got = []
    while not received.empty():
        got.append(received.get_nowait())
    return got


def test_heartbeats_answer_while_a_long_step_computes(tiny_llama, tmp_path):
    """A node whose span takes 8 s per step (a deliberately slow span: its worker thread stays
    busy, holding the GIL as Python code does) answers every heartbeat meanwhile: torch runs
    on the span worker's thread, never on the event loop that serves the heartbeats. The
    admin never suspects it, nothing is failed over, and the answer is the one it should be.
    (With decode rounds on the event loop, the beats waited for the step: suspect after one
    beat timeout, dead after ``dead_after_s`` = 4 s, and a failover of a healthy node.)"""
    from tests.integration.test_chain import reference_tokens
    from tiktrue.model.engine import Span
    from tiktrue.node.served_span import SLOW_STEP_ENV
    from tiktrue.service.local_network import LocalCluster, prepare_local_network

    order = tiny_llama.manifest.model_chain_order
    spans = [Span.of(order, "embed", "layer_1"), Span.of(order, "layer_2", "head")]
    homes, config = prepare_local_network(tmp_path / "c", tiny_llama, spans=spans, network_id=NET)
    slow = config.nodes[1].node_id
    cluster = LocalCluster(homes, kv_budget_mb=16, node_env={1: {SLOW_STEP_ENV: "8"}})
    cluster.start()
    try:
        admin = homes[0]
        wait_for(lambda: set(states(admin).values()) == {"online"}, "all nodes online")
        began = time.time()
        replies = asyncio.run(answer(cluster, max_tokens=1))
        ended = time.time()
        assert token_ids(replies) == reference_tokens(tiny_llama, [5, 17, 42], 1)
        assert ended - began >= 8  # the slow step did run (a bound on the test, not a claim)
        log = recent_events(events_path(admin), 1000, NET)
        trouble = [e for e in log if e["event"] in ("node_suspect", "node_dead", "failover")]
        assert not trouble, trouble
        assert states(admin)[slow] == "online"
    finally:
        cluster.stop()
