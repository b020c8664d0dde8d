"""The event log: JSON lines, rotation, reading back, and the webhook."""

from __future__ import annotations

import json
import logging

import pytest

from tests.helpers.webhook import webhook_receiver
from tiktrue.monitoring.monitoring_system import EventLog, events_path, recent_events
from tiktrue.node.resources import free_ports


def test_events_are_json_lines_read_back_in_order(tmp_path):
    events = EventLog(tmp_path)
    first = events.log_system_events("node_suspect", level="warning", network_id="a", node_id="n1")
    events.log_system_events("node_dead", level="error", network_id="a", node_id="n1", why="x")
    events.log_system_events("node_online", network_id="b", node_id="n2")
    events.close()
    lines = events_path(tmp_path).read_text("utf-8").splitlines()
    assert [json.loads(line)["event"] for line in lines] == [
        "node_suspect",
        "node_dead",
        "node_online",
    ]
    assert first["level"] == "warning" and first["ts"].endswith("+00:00")
    assert [e["event"] for e in events.recent(network_id="a")] == ["node_suspect", "node_dead"]
    assert events.recent(network_id="a")[-1]["why"] == "x"
    assert [e["event"] for e in events.recent(limit=1)] == ["node_online"]


def test_the_log_rotates_and_reading_spans_the_old_files(tmp_path):
    events = EventLog(tmp_path, max_bytes=2000, backups=5)
    for i in range(60):
        events.log_system_events("tick", network_id="a", index=i, padding="x" * 50)
    events.close()
    path = events_path(tmp_path)
    rotated = sorted(p.name for p in path.parent.glob("events.jsonl.*"))
    assert rotated and all(p.stat().st_size <= 2000 for p in path.parent.iterdir())
    got = recent_events(path, limit=20)
    assert [e["index"] for e in got] == list(range(40, 60))


def test_unknown_levels_are_refused(tmp_path):
    with pytest.raises(ValueError, match="level"):
        EventLog(tmp_path).log_system_events("x", level="loud")


def test_the_webhook_gets_the_networks_events(tmp_path):
    events = EventLog(tmp_path)
    with webhook_receiver() as (url, received):
        events.set_webhook("a", url)
        events.log_system_events("node_dead", level="error", network_id="a", node_id="n1")
        events.log_system_events("node_dead", level="error", network_id="b", node_id="n2")
        got = received.get(timeout=60)
        events.close()  # waits for the posts under way
        assert received.empty()  # network b has no webhook
    assert (got["event"], got["network_id"], got["node_id"]) == ("node_dead", "a", "n1")


def test_a_webhook_that_is_down_is_logged_and_the_event_kept(tmp_path, caplog):
    events = EventLog(tmp_path)
    events.set_webhook("a", f"http://127.0.0.1:{free_ports(1)[0]}/nobody")
    with caplog.at_level(logging.WARNING, logger="tiktrue.events"):
        events.log_system_events("node_dead", level="error", network_id="a")
        events.close()
    assert "did not take event node_dead" in caplog.text
    assert [e["event"] for e in recent_events(events_path(tmp_path))] == ["node_dead"]
