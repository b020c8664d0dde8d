"""``/metrics`` on the gateway of real node processes: after one chat its text passes
``promtool check metrics`` (Debian's ``prometheus`` package) and its generated-token counter
has counted the chat's tokens; only an admin's key or this PC itself may read it; a token
quota refuses the next request with 429 and ``Retry-After``."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.cluster import api_key, openai_client
from tiktrue.security.users import UserStore

pytestmark = pytest.mark.integration
LAN_SOURCE = "127.0.0.2"  # no interface's address: the gateway takes it for a LAN caller


def metrics_url(cluster) -> str:
    return cluster.api_url.removesuffix("/v1") + "/metrics"


def scrape(cluster, **kwargs) -> str:
    reply = httpx.get(metrics_url(cluster), timeout=120, **kwargs)
    assert reply.status_code == 200, reply.text
    return reply.text


def sample(text: str, name: str, **labels) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_count_a_chat_and_pass_promtool(tiny_cluster):
    cluster, homes, config = tiny_cluster
    before = scrape(cluster)
    client = openai_client(cluster, homes[0])
    answer = client.chat.completions.create(
        model=config.model_id, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12
    )
    after = scrape(cluster)
    name = "tiktrue_generation_tokens_total"
    counted = sample(after, name, network="testnet") - sample(before, name, network="testnet")
    assert counted == answer.usage.completion_tokens > 0
    prompt = "tiktrue_prompt_tokens_total"
    assert sample(after, prompt) - sample(before, prompt) == answer.usage.prompt_tokens
    assert sample(after, "tiktrue_requests_total", network="testnet") >= 1
    assert sample(after, "tiktrue_time_to_first_token_seconds_count") >= 1
    # the node's own figures, read at scrape time
    assert sample(after, "tiktrue_process_resident_memory_bytes") > 0
    assert sample(after, "tiktrue_kv_pages_capacity", network="testnet") > 0
    assert sample(after, "tiktrue_config_version", network="testnet") >= 1
    assert sample(after, "tiktrue_node_state", network="testnet", state="online") == 3

    # OpenMetrics when asked, as Prometheus asks: its strict parser reads it whole
    openmetrics = scrape(cluster, headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.endswith("# EOF\n")
    families = {f.name for f in openmetrics_families(openmetrics)}
    assert "tiktrue_generation_tokens" in families

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian: apt-get install prometheus; `make test` does)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=after, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_are_for_an_admin_or_this_pc(tiny_cluster):
    cluster, homes, _ = tiny_cluster
    users = UserStore(homes[0], rounds=4)
    if not any(u.name == "metrics-reader" for u in users.list_users()):
        api_key(homes[0])  # the node's first account (the admin) exists first
        users.add_user("metrics-reader", "a long password", "user")
    user_key = users.create_key("metrics-reader")[1]
    admin = next(u for u in users.list_users() if u.role == "admin")
    admin_key = users.create_key(admin.name)[1]
    lan = httpx.Client(transport=httpx.HTTPTransport(local_address=LAN_SOURCE), timeout=120)
    with lan:
        assert lan.get(metrics_url(cluster)).status_code == 401  # no key from the LAN
        refused = lan.get(metrics_url(cluster), headers={"Authorization": f"Bearer {user_key}"})
        assert refused.status_code == 403
        allowed = lan.get(metrics_url(cluster), headers={"Authorization": f"Bearer {admin_key}"})
        assert allowed.status_code == 200
        assert "tiktrue_build_info" in allowed.text


def test_a_token_quota_refuses_the_next_request_with_429(tiny_cluster):
    cluster, homes, config = tiny_cluster
    users = UserStore(homes[0], rounds=4)
    api_key(homes[0])  # the node's first account exists
    owner = users.list_users()[0].name
    record, key = users.create_key(owner, name="quota", tpd=5)
    client = openai_client(cluster, homes[0]).with_options(api_key=key)
    messages = [{"role": "user", "content": "Hello"}]
    first = client.chat.completions.create(model=config.model_id, messages=messages, max_tokens=4)
    assert first.usage.total_tokens > 5  # this answer passes the quota by its own length
    assert users.tokens_today(f"key:{record.id}") == first.usage.total_tokens
    refused = httpx.post(
        f"{cluster.api_url}/chat/completions",
        json={"model": config.model_id, "messages": messages, "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert refused.status_code == 429, refused.text
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert "5 tokens per day" in refused.json()["error"]["message"]
    # the account's other keys are not this key's quota
    other = users.create_key(owner, name="no quota")[1]
    fine = httpx.post(
        f"{cluster.api_url}/chat/completions",
        json={"model": config.model_id, "messages": messages, "max_tokens": 2},
        headers={"Authorization": f"Bearer {other}"},
        timeout=120,
    )
    assert fine.status_code == 200, fine.text


def run_cli(home, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "tiktrue", *args],
        env={**os.environ, "TIKTRUE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_report_shows_the_chats_tokens(tiny_cluster, tmp_path):
    cluster, homes, config = tiny_cluster
    openai_client(cluster, homes[0]).chat.completions.create(
        model=config.model_id, messages=[{"role": "user", "content": "Tell me"}], max_tokens=9
    )
    counted = sample(scrape(cluster), "tiktrue_generation_tokens_total", network="testnet")
    rows = list(
        csv.reader(
            io.StringIO(run_cli(homes[0], "report", "--since", "1h", "--format", "csv").stdout)
        )
    )
    ours = [r for r in rows if r[:2] == ["Tokens per network", "testnet"]]
    assert len(ours) == 1 and int(ours[0][5]) == counted > 0  # the history counted each answer
    per_pc = [r for r in rows if r[:2] == ["Per PC", "testnet"]]
    assert {r[2] for r in per_pc} == {n.node_id for n in config.nodes}  # each node's compute
    text = run_cli(homes[0], "report", "--since", "1h").stdout
    assert "Tokens per network" in text and f" {int(counted)} " in text
    page = tmp_path / "report.html"
    run_cli(homes[0], "report", "--since", "1h", "--format", "html", "--out", str(page))
    assert page.read_text().count("<svg") >= 3


def test_a_threshold_the_admin_sets_raises_an_alert_event_then_clears_it(tiny_cluster):
    cluster, homes, config = tiny_cluster
    events = homes[0] / "logs" / "events.jsonl"

    def alert_events(name: str) -> set[str]:
        found = set()
        for line in events.read_text().splitlines() if events.is_file() else []:
            record = json.loads(line)
            if record.get("event") == name and record.get("alert") == "ram_used":
                found.add(record["node_id"])
        return found

    run_cli(homes[0], "ops", "alerts", "--set", "ram_used=1%")  # every PC is over 1%
    nodes = {n.node_id for n in config.nodes}
    deadline = time.monotonic() + 120  # a ceiling for a busy machine, never a pace
    while alert_events("alert_raised") != nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alert_events("alert_raised") == nodes
    assert sample(scrape(cluster), "tiktrue_alerts_active", alert="ram_used") == 3
    shown = run_cli(homes[0], "ops", "alerts").stdout
    assert "ram_used" in shown and "1%" in shown and "alert_raised" in shown
    run_cli(homes[0], "ops", "alerts", "--set", "ram_used=off")
    while alert_events("alert_cleared") != nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alert_events("alert_cleared") == nodes
    assert sample(scrape(cluster), "tiktrue_alerts_active", alert="ram_used") == 0
