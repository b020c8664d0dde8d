"""Threshold alerts: RAM, disk, KV cache use, queue length and TTFT p95 over thresholds the
admin sets become events (``alert_raised``, ``alert_cleared``) in the node's event log, so
they reach its webhook and the dashboard's alerts, with hysteresis so that a figure hovering
at its threshold does not flap: an alert is raised once a figure goes over its threshold and
cleared only when it falls ``HYSTERESIS`` (10%) below it.

The admin feeds each node's heartbeat figures (``observe``); the gateway's node feeds its
queue and TTFT. Thresholds live in ``<data>/monitoring.json`` (``tiktrue ops alerts``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

HYSTERESIS = 0.10


@dataclass(frozen=True)
class AlertKind:
    name: str
    what: str  # for people: "RAM in use"
    default: float
    percent: bool  # a ratio shown as a percentage


KINDS = {
    k.name: k
    for k in (
        AlertKind("ram_used", "RAM in use", 0.90, True),
        AlertKind("disk_used", "disk in use (data dir)", 0.90, True),
        AlertKind("kv_used", "KV cache in use", 0.95, True),
        AlertKind("queue_length", "answers in progress on the gateway", 16, False),
        AlertKind("ttft_p95_s", "time to first token, p95 of the last 5 minutes (s)", 10.0, False),
    )
}


def thresholds_of(settings: dict) -> dict[str, float | None]:
    """The thresholds in force: the defaults, with the admin's own (None: that alert off)."""
    chosen = settings.get("thresholds") or {}
    return {name: chosen.get(name, kind.default) for name, kind in KINDS.items()}


def check_threshold(name: str, value: str) -> float | None:
    """A threshold as the admin types it (``off`` for none); raises ValueError."""
    if name not in KINDS:
        raise ValueError(f"unknown alert {name!r} (alerts: {', '.join(KINDS)})")
    if value.strip().lower() in ("off", "none", ""):
        return None
    number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    if number <= 0 or (KINDS[name].percent and number > 1):
        raise ValueError(
            f"{name}: a share of 0-1 (or 1%-100%)"
            if KINDS[name].percent
            else f"{name}: a positive number"
        )
    return number


def node_figures(stats: dict) -> dict[str, float]:
    """The alert figures in a heartbeat's answer (those it has)."""
    found = {}
    if stats.get("ram_total_bytes") and stats.get("ram_free_bytes") is not None:
        found["ram_used"] = 1 - stats["ram_free_bytes"] / stats["ram_total_bytes"]
    if stats.get("disk_total_bytes") and stats.get("disk_free_bytes") is not None:
        found["disk_used"] = 1 - stats["disk_free_bytes"] / stats["disk_total_bytes"]
    if stats.get("kv_pages_total"):
        found["kv_used"] = (stats.get("kv_pages_used") or 0) / stats["kv_pages_total"]
    return found


def describe(name: str, value: float) -> str:
    kind = KINDS[name]
    return f"{100 * value:.0f}%" if kind.percent else f"{value:g}"


# emit(event, level=..., network_id=..., node_id=..., **details)
Emit = Callable[..., object]


class AlertTracker:
    """Which alerts are raised, per network, node and kind; raises and clears them."""

    def __init__(self, thresholds: Callable[[], dict[str, float | None]], emit: Emit) -> None:
        self.thresholds = thresholds
        self.emit = emit
        self.active: dict[tuple[str, str, str], float] = {}  # (network, node, alert) -> value
        self._lock = threading.Lock()

    def observe(self, network_id: str, node_id: str, figures: dict[str, float]) -> None:
        limits = self.thresholds()
        for name, value in figures.items():
            limit = limits.get(name)
            key = (network_id, node_id, name)
            with self._lock:
                raised = key in self.active
                if limit is None:  # switched off: an alert raised before is cleared
                    go_up, go_down = False, raised
                else:
                    go_up = not raised and value > limit
                    go_down = raised and value < limit * (1 - HYSTERESIS)
                if go_up:
                    self.active[key] = value
                elif go_down:
                    del self.active[key]
                elif raised:
                    self.active[key] = value
            if go_up:
                self.emit(
                    "alert_raised",
                    level="warning",
                    network_id=network_id,
                    node_id=node_id,
                    alert=name,
                    value=round(value, 4),
                    threshold=limit,
                    message=f"{KINDS[name].what}: {describe(name, value)} on {node_id} "
                    f"(over {describe(name, limit)})",
                )
            elif go_down:
                self.emit(
                    "alert_cleared",
                    level="info",
                    network_id=network_id,
                    node_id=node_id,
                    alert=name,
                    value=round(value, 4),
                    threshold=limit,
                    message=f"{KINDS[name].what}: {describe(name, value)} on {node_id}, "
                    "back under its threshold",
                )

    def forget(self, network_id: str, keep_nodes: set[str]) -> None:
        """Nodes that left the network: their alerts go (without an event)."""
        with self._lock:
            for key in [k for k in self.active if k[0] == network_id and k[1] not in keep_nodes]:
                del self.active[key]
