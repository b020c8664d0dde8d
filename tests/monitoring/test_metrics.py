"""The node's metrics without a network: answers and events counted, figures read at scrape
time, one network's view, the Prometheus config and the Grafana dashboard kept to the
metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tiktrue.gateway.chain_client import StepTiming
from tiktrue.model.generation import GenerationResult
from tiktrue.monitoring.metrics import NodeMetrics
from tiktrue.monitoring.prometheus_config import scrape_config, target_groups

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "node": {
        "cpu_percent": 50.0,
        "ram_total_bytes": 8 << 30,
        "ram_free_bytes": 2 << 30,
        "disk_total_bytes": 100 << 30,
        "disk_free_bytes": 40 << 30,
        "rss_bytes": 1 << 29,
    },
    "networks": {
        "net-a": {
            "version": 7,
            "serving": True,
            "sessions": 2,
            "kv_pages_used": 3,
            "kv_pages_total": 12,
            "block_faults": {"layer_1": "sha256"},
            "link_rtt_ms": {"next": 1.5},
            "steps": {"steps": 40, "batched_steps": 10, "rounds": 35, "largest_batch": 3},
            "queued": {"quick": 1, "normal": 0, "deep": 2},
        },
        "net-b": {"version": 2, "serving": False},
    },
    "gateways": {"net-a": {"model": "m", "running": 2, "healthy": False, "sessions": 5}},
    "health": {"net-a": {"n1": {"state": "online", "rtt_ms": 2.0}, "n2": {"state": "dead"}}},
}


def samples(metrics: NodeMetrics, network: str | None = None) -> dict[tuple, float]:
    text = metrics.render(None, network)[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def answer() -> GenerationResult:
    result = GenerationResult(text="hi", token_ids=[5, 6, 7], finish_reason="length")
    result.prompt_tokens, result.time_to_first_token = 11, 0.3
    result.decode_steps, result.decode_seconds = 2, 0.1
    nodes = [
        {"node": "n1", "compute_ms": 4.0, "total_ms": 5.0},
        {"node": "n2", "compute_ms": 6.0, "total_ms": 7.0},
    ]
    result.step_timings = [StepTiming(20.0, nodes), StepTiming(30.0, nodes)]
    return result


def test_an_answer_and_the_figures_become_metrics():
    metrics = NodeMetrics("me", figures=lambda: FIGURES)
    metrics.record_answer("net-a", "m", answer(), error=False)
    found = samples(metrics)
    assert value(found, "tiktrue_generation_tokens_total", network="net-a", model="m") == 3
    assert value(found, "tiktrue_prompt_tokens_total", network="net-a", model="m") == 11
    assert (
        value(found, "tiktrue_requests_total", network="net-a", model="m", finish_reason="length")
        == 1
    )
    assert (
        value(found, "tiktrue_inter_token_latency_seconds_count", network="net-a", model="m") == 2
    )
    assert value(found, "tiktrue_node_compute_seconds_sum", network="net-a", node="n2") == (
        pytest.approx(0.012)
    )
    assert value(found, "tiktrue_step_transit_seconds_sum", network="net-a") == (
        pytest.approx((20 - 12 + 30 - 12) / 1000)
    )
    assert value(found, "tiktrue_kv_cache_usage_ratio", network="net-a") == 0.25
    assert value(found, "tiktrue_block_faults", network="net-a") == 1
    assert value(found, "tiktrue_cpu_usage_ratio") == 0.5
    assert value(found, "tiktrue_requests_waiting", network="net-a", model="m") == 2
    assert value(found, "tiktrue_node_state", network="net-a", node="n2", state="dead") == 1
    assert value(found, "tiktrue_span_steps_total", network="net-a") == 40
    assert value(found, "tiktrue_span_queue_steps", network="net-a", **{"class": "deep"}) == 2
    # a member of net-b reads nothing of net-a, and the node's own figures
    only_b = samples(metrics, "net-b")
    assert value(only_b, "tiktrue_config_version", network="net-b") == 2
    assert not [k for k in only_b if dict(k[1]).get("network") == "net-a"]
    assert value(only_b, "tiktrue_cpu_usage_ratio") == 0.5


def test_a_failed_reading_still_answers_and_a_failover_pause_is_measured():
    def broken():
        raise OSError("no disk")

    metrics = NodeMetrics("me", figures=broken)
    metrics.on_event(
        {
            "event": "node_suspect",
            "level": "warning",
            "network_id": "n",
            "node_id": "w",
            "time": 100.0,
        }
    )
    metrics.on_event(
        {"event": "node_dead", "level": "error", "network_id": "n", "node_id": "w", "time": 103.0}
    )
    metrics.on_event(
        {"event": "failover", "level": "warning", "network_id": "n", "node_id": "w", "time": 104.5}
    )
    found = samples(metrics)
    assert value(found, "tiktrue_failovers_total", network="n") == 1
    assert value(found, "tiktrue_failover_pause_seconds_sum", network="n") == 4.5
    assert value(found, "tiktrue_events_total", event="node_dead", level="error") == 1


def test_the_grafana_dashboard_and_prometheus_example_name_real_metrics():
    metrics = NodeMetrics("me", figures=lambda: FIGURES)
    metrics.record_answer("net-a", "m", answer(), error=False)
    for event in ("node_dead", "failover"):
        metrics.on_event({"event": event, "network_id": "net-a", "node_id": "x", "level": "x"})
    metrics.alerts.labels("net-a", "n1", "ram").set(1)
    exposed = {name for name, _ in samples(metrics)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tiktrue.json").read_text())
    assert dashboard["title"] == "TikTrue Overview"
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"tiktrue_[a-z0-9_]+", target["expr"])
    }
    used |= set(re.findall(r"tiktrue_[a-z0-9_]+", json.dumps(dashboard["templating"])))
    assert used and not used - exposed, f"the dashboard names unknown metrics: {used - exposed}"
    example = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert example == scrape_config(["net-1a2b3c4d"])


def test_targets_list_each_node_where_its_heartbeat_says():
    nodes = [
        {
            "node_id": "b",
            "role": "worker",
            "metrics": {"scheme": "https", "host": "192.168.1.5", "port": 41000},
        },
        {
            "node_id": "a",
            "role": "admin",
            "metrics": {"scheme": "http", "host": "192.168.1.4", "port": 8000},
        },
        {"node_id": "c", "role": "worker", "metrics": None},  # no beat yet
    ]
    groups = target_groups("net", nodes)
    assert [g["targets"] for g in groups] == [["192.168.1.4:8000"], ["192.168.1.5:41000"]]
    assert groups[0]["labels"] == {
        "network": "net",
        "node": "a",
        "role": "admin",
        "__scheme__": "http",
    }


def test_ops_prometheus_writes_a_config_promtool_accepts(tiny_llama, tmp_path):
    from tiktrue.control.prometheus_setup import setup_prometheus
    from tiktrue.monitoring.prometheus_config import read_settings, tls_files
    from tiktrue.security.access_control import METRICS_READERS, check_control
    from tiktrue.security.auth_manager import IdentityError, certificate_info, verify_certificate
    from tiktrue.service.local_network import prepare_local_network

    homes, config = prepare_local_network(tmp_path / "net", tiny_llama, nodes=2)
    done = setup_prometheus(homes[0], tmp_path / "prom", interval_s=5)
    assert done.networks == [config.network_id]
    assert read_settings(homes[0])["prometheus_dir"] == str(tmp_path / "prom")
    files = tls_files(tmp_path / "prom", config.network_id)
    cert = files["cert"].read_bytes()
    assert certificate_info(cert).role == "monitor" in METRICS_READERS
    assert files["key"].stat().st_mode & 0o077 == 0  # owner-only
    # the scraper's certificate is no node's: node and block links refuse it
    with pytest.raises(IdentityError, match="unknown role"):
        verify_certificate(cert, files["ca"].read_bytes())
    with pytest.raises(ValueError, match="administers no network"):
        setup_prometheus(homes[1], tmp_path / "other")
    from tiktrue.security.access_control import AccessDenied, Caller

    with pytest.raises(AccessDenied):  # were it proved: no control operation is its
        check_control("ping", Caller("monitor", "x", config.network_id), None)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian: apt-get install prometheus; `make test` does)")
    checked = subprocess.run(
        [promtool, "check", "config", str(done.config)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
