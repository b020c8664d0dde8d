"""Threshold alerts with hysteresis: raised once over the threshold, cleared only well under
it, never flapping around it; thresholds the admin sets (or switches off)."""

from __future__ import annotations

import pytest

from tiktrue.monitoring.alerts import (
    AlertTracker,
    check_threshold,
    node_figures,
    thresholds_of,
)


def tracker(**limits):
    events = []
    found = AlertTracker(
        lambda: {**thresholds_of({}), **limits}, lambda e, **f: events.append((e, f))
    )
    return found, events


def test_an_alert_is_raised_once_and_cleared_only_below_the_band():
    alerts, events = tracker(ram_used=0.9)
    for value in (0.80, 0.91, 0.95, 0.89, 0.92, 0.85, 0.90, 0.91):  # hovering at 90%
        alerts.observe("net", "n1", {"ram_used": value})
    assert [e for e, _ in events] == ["alert_raised"]
    raised = events[0][1]
    assert raised["alert"] == "ram_used" and raised["level"] == "warning"
    assert raised["message"] == "RAM in use: 91% on n1 (over 90%)"
    assert alerts.active == {("net", "n1", "ram_used"): 0.91}
    alerts.observe("net", "n1", {"ram_used": 0.80})  # under 90% - 10%
    assert [e for e, _ in events] == ["alert_raised", "alert_cleared"]
    assert not alerts.active
    alerts.observe("net", "n2", {"ram_used": 0.99})  # per node
    alerts.observe("net", "n1", {"ram_used": 0.5})
    assert list(alerts.active) == [("net", "n2", "ram_used")]
    alerts.forget("net", {"n1"})  # n2 left the network
    assert not alerts.active


def test_a_threshold_switched_off_clears_its_alert():
    limits = {"queue_length": 4}
    events = []
    alerts = AlertTracker(lambda: {**thresholds_of({}), **limits}, lambda e, **f: events.append(e))
    alerts.observe("net", "gw", {"queue_length": 6})
    limits["queue_length"] = None
    alerts.observe("net", "gw", {"queue_length": 6})
    assert events == ["alert_raised", "alert_cleared"]


def test_thresholds_as_the_admin_types_them():
    assert check_threshold("disk_used", "85%") == pytest.approx(0.85)
    assert check_threshold("ttft_p95_s", "4.5") == 4.5
    assert check_threshold("kv_used", "off") is None
    for name, value in (("disk_used", "150%"), ("queue_length", "-1"), ("cpu", "1")):
        with pytest.raises(ValueError):
            check_threshold(name, value)
    settings = {"thresholds": {"kv_used": None, "ram_used": 0.5}}
    assert thresholds_of(settings)["kv_used"] is None
    assert thresholds_of(settings)["ram_used"] == 0.5
    assert thresholds_of(settings)["disk_used"] == 0.9  # the default


def test_a_heartbeat_gives_ram_disk_and_kv_figures():
    stats = {
        "ram_total_bytes": 100,
        "ram_free_bytes": 25,
        "disk_total_bytes": 10,
        "disk_free_bytes": 1,
        "kv_pages_used": 3,
        "kv_pages_total": 4,
    }
    assert node_figures(stats) == {"ram_used": 0.75, "disk_used": 0.9, "kv_used": 0.75}
    assert node_figures({"ram_total_bytes": None}) == {}
