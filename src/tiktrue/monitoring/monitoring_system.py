"""The node's structured event log (seed ``monitoring_system``): one JSON object per line in
``<data>/logs/events.jsonl``, rotated by size, so a person (``tiktrue network events``) or a
script can see what the network went through: a node suspected, dead, back online.

Events of a network with a webhook URL are also POSTed to it as JSON, from one background
thread with a short timeout: an unreachable webhook is logged and never blocks the caller.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("tiktrue.events")

EVENTS_FILE = "events.jsonl"
MAX_BYTES = 1 << 20  # per file; with BACKUPS old files, at most ~6 MiB of history
BACKUPS = 5
WEBHOOK_TIMEOUT_S = 3.0
LEVELS = ("debug", "info", "warning", "error", "critical")


def events_path(data_dir: Path) -> Path:
    return Path(data_dir) / "logs" / EVENTS_FILE


class EventLog:
    """Append-only, rotated JSON-lines log of the node's events, plus per-network webhooks."""

    def __init__(
        self, data_dir: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS
    ) -> None:
        self.path = events_path(data_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self.webhooks: dict[str, str] = {}  # network id -> URL
        self.listeners: list[Callable[[dict], None]] = []  # hear every event (metrics, ...)
        self._posts: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def set_webhook(self, network_id: str, url: str | None) -> None:
        """Where this network's events are POSTed (``None``: nowhere)."""
        if url:
            self.webhooks[network_id] = url
        else:
            self.webhooks.pop(network_id, None)

    def log_system_events(
        self,
        event: str,
        *,
        level: str = "info",
        network_id: str | None = None,
        node_id: str | None = None,
        **details: Any,
    ) -> dict:
        """Record one event (a short snake_case name and JSON-able details); returns it."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
        now = time.time()
        record = {
            "ts": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "time": now,
            "event": event,
            "level": level,
            "network_id": network_id,
            "node_id": node_id,
            **details,
        }
        line = json.dumps(record, default=str)
        self._handler.handle(logging.makeLogRecord({"msg": line, "args": None}))
        url = self.webhooks.get(network_id) if network_id else None
        if url:
            self._post_later(url, record)
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:  # a listener must not lose the event for the others
                log.exception("an event listener failed on %s", event)
        return record

    def add_listener(self, listener: Callable[[dict], None]) -> None:
        """``listener(record)`` hears every event from now on (on the caller's thread)."""
        self.listeners.append(listener)

    def recent(self, limit: int = 100, network_id: str | None = None) -> list[dict]:
        """The last ``limit`` events (oldest first), of one network or of all."""
        return recent_events(self.path, limit, network_id)

    def _post_later(self, url: str, record: dict) -> None:
        with self._lock:
            if self._posts is None:
                self._posts = ThreadPoolExecutor(1, thread_name_prefix="webhook")
            self._posts.submit(_post, url, record)

    def close(self) -> None:
        """Wait for the webhook posts under way (each bounded by its timeout), close the file."""
        with self._lock:
            posts, self._posts = self._posts, None
        if posts is not None:
            posts.shutdown(wait=True)
        self._handler.close()


def _post(url: str, record: dict) -> None:
    try:
        httpx.post(url, json=record, timeout=WEBHOOK_TIMEOUT_S).raise_for_status()
    except Exception as exc:  # a webhook that is down must not take the node down
        log.warning("webhook %s did not take event %s: %s", url, record["event"], exc)


def recent_events(path: Path, limit: int = 100, network_id: str | None = None) -> list[dict]:
    """Read the log (current file first, then the rotated ones) until ``limit`` events."""
    found: list[dict] = []
    files = [path] + [path.with_name(f"{path.name}.{i}") for i in range(1, BACKUPS + 1)]
    for file in files:
        if len(found) >= limit or not file.is_file():
            break
        older = []
        for line in file.read_text("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if network_id is None or record.get("network_id") == network_id:
                older.append(record)
        found = older + found
    return found[-limit:] if limit > 0 else []
