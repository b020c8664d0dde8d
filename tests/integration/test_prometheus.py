"""A real Prometheus (Debian's ``prometheus`` package) started from the config that
``tiktrue ops prometheus`` writes scrapes every node of a network of real node processes as
up (the gateway on its port, the workers on their metrics ports over mutual TLS with the
read-only ``monitor`` certificate), and its HTTP API returns the chat's token counter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.cluster import openai_client
from tiktrue.node.resources import free_ports

pytestmark = pytest.mark.integration
CEILING_S = 150  # a busy 2-core machine: a ceiling, never a pace
LAN_SOURCE = "127.0.0.2"


def wait_for(what: str, check, ceiling: float = CEILING_S):
    deadline = time.monotonic() + ceiling
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {ceiling} s")
        time.sleep(0.5)


def test_prometheus_scrapes_every_node_from_the_generated_config(tiny_cluster, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is missing (Debian: apt-get install prometheus; `make test` does)")
    cluster, homes, config = tiny_cluster
    answer = openai_client(cluster, homes[0]).chat.completions.create(
        model=config.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=6
    )
    folder = tmp_path / "prometheus"
    made = subprocess.run(
        [sys.executable, "-m", "tiktrue", "ops", "prometheus", "--out", str(folder)]
        + ["--interval", "1"],
        env={**os.environ, "TIKTRUE_HOME": str(homes[0])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    targets = folder / "targets" / f"{config.network_id}.json"

    def every_node_listed():
        groups = json.loads(targets.read_text()) if targets.is_file() else []
        return groups if len(groups) == 3 else None

    groups = wait_for("the admin listing every node", every_node_listed)
    schemes = sorted(g["labels"]["__scheme__"] for g in groups)
    assert schemes == ["http", "https", "https"]  # the gateway's port, two metrics ports

    # a worker's metrics port: only a certificate of the network, or this PC itself
    worker = next(g for g in groups if g["labels"]["__scheme__"] == "https")
    url = f"https://{worker['targets'][0]}/metrics"
    lan = httpx.Client(
        transport=httpx.HTTPTransport(local_address=LAN_SOURCE, verify=False), timeout=60
    )
    with lan:
        assert lan.get(url).status_code == 403
    local = httpx.get(url, verify=False, timeout=60)
    assert local.status_code == 200 and "tiktrue_span_steps_total" in local.text

    port = free_ports(1, "127.0.0.1")[0]
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:

        def all_up():
            try:
                active = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError, KeyError):
                return None
            ours = [t for t in active if t["labels"].get("network") == config.network_id]
            healthy = len(ours) == 3 and all(t["health"] == "up" for t in ours)
            return ours if healthy else None

        up = wait_for("every node scraped as up", all_up)
        assert {t["labels"]["node"] for t in up} == {n.node_id for n in config.nodes}

        def tokens():
            query = {
                "query": f'sum(tiktrue_generation_tokens_total{{network="{config.network_id}"}})'
            }
            result = httpx.get(f"{api}/query", params=query, timeout=10).json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        assert wait_for("the token counter in Prometheus", tokens) >= answer.usage.completion_tokens
    finally:
        server.terminate()
        server.wait(30)
