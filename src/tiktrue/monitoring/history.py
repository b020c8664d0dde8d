"""Metrics kept as history in the node's SQLite file (``<data>/tiktrue.db``), for reports.

Written where the figures are: the gateway adds each answer when it ends (``record_answer``:
tokens, time to first token, decode speed, each node's compute per step, the account and key
that asked); the admin adds each of its nodes' heartbeat figures once a minute
(``record_nodes``: state, CPU, RAM, KV use). Rows are hourly sums, written as they come
(one upsert per answer), so the store never holds a row per token or per answer:

- ``usage_history``: per hour, network, model, account and key: answers, prompt and generated
  tokens, decode steps and seconds, TTFT sum and a histogram (the buckets of
  ``metrics.TTFT_BUCKETS``; percentiles are read from it as Prometheus does);
- ``node_history``: per hour, network and node: decode steps and compute ms (from the chain's
  step timings), heartbeat samples, samples online, CPU, RAM used and KV use sums;
- ``hop_history``: per hour, network, node and config version (a plan: the node's span): its
  decode steps, their compute, the time they waited there (queue and framing) and the ping
  round trip of its link to the next node; ``usage_history`` also sums the decode steps' time
  in transit. The rebalancing (``control.resource_optimizer``) reads them.

Bounded and downsampled: ``compact`` folds hourly rows older than ``HOURLY_DAYS`` into one row
per day and drops days older than ``KEEP_DAYS``. ``span_s`` says which (3600 or 86400).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue.database import Database
from tiktrue.monitoring.metrics import TTFT_BUCKETS

COMPONENT = "monitoring"
HOUR_S, DAY_S = 3600, 86400
HOURLY_DAYS = 14  # hourly rows this long, then one row per day
KEEP_DAYS = 400
NO_ONE = 0  # user_id / key_id of callers without an account or key

MIGRATIONS = [
    [
        "CREATE TABLE usage_history ("
        " start INTEGER NOT NULL, span_s INTEGER NOT NULL,"
        " network_id TEXT NOT NULL, model_id TEXT NOT NULL,"
        " user_id INTEGER NOT NULL, key_id INTEGER NOT NULL,"
        " answers INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,"
        " completion_tokens INTEGER NOT NULL, decode_steps INTEGER NOT NULL,"
        " decode_s REAL NOT NULL, ttft_sum REAL NOT NULL, ttft_buckets TEXT NOT NULL,"
        " PRIMARY KEY (start, span_s, network_id, model_id, user_id, key_id))",
        "CREATE TABLE node_history ("
        " start INTEGER NOT NULL, span_s INTEGER NOT NULL,"
        " network_id TEXT NOT NULL, node_id TEXT NOT NULL,"
        " steps INTEGER NOT NULL DEFAULT 0, compute_ms REAL NOT NULL DEFAULT 0,"
        " samples INTEGER NOT NULL DEFAULT 0, online INTEGER NOT NULL DEFAULT 0,"
        " cpu_sum REAL NOT NULL DEFAULT 0, ram_used_sum REAL NOT NULL DEFAULT 0,"
        " kv_used_sum REAL NOT NULL DEFAULT 0,"
        " PRIMARY KEY (start, span_s, network_id, node_id))",
    ],
    [  # per hop and plan: what the rebalancing reads (resource_optimizer)
        "CREATE TABLE hop_history ("
        " start INTEGER NOT NULL, span_s INTEGER NOT NULL,"
        " network_id TEXT NOT NULL, node_id TEXT NOT NULL, version INTEGER NOT NULL,"
        " steps INTEGER NOT NULL DEFAULT 0, compute_ms REAL NOT NULL DEFAULT 0,"
        " wait_ms REAL NOT NULL DEFAULT 0, link_ms REAL NOT NULL DEFAULT 0,"
        " link_samples INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (start, span_s, network_id, node_id, version))",
        "ALTER TABLE usage_history ADD COLUMN transit_ms REAL NOT NULL DEFAULT 0",
    ],
]
USAGE_SUMS = (
    "answers",
    "prompt_tokens",
    "completion_tokens",
    "decode_steps",
    "decode_s",
    "ttft_sum",
    "transit_ms",
)
NODE_SUMS = ("steps", "compute_ms", "samples", "online", "cpu_sum", "ram_used_sum", "kv_used_sum")
HOP_SUMS = ("steps", "compute_ms", "wait_ms", "link_ms", "link_samples")
KEYS = {
    "usage_history": ("start", "span_s", "network_id", "model_id", "user_id", "key_id"),
    "node_history": ("start", "span_s", "network_id", "node_id"),
    "hop_history": ("start", "span_s", "network_id", "node_id", "version"),
}


def ttft_histogram(seconds: float) -> list[int]:
    """One answer's TTFT as counts per bucket (the last: over the largest bound)."""
    counts = [0] * (len(TTFT_BUCKETS) + 1)
    counts[next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))] = 1
    return counts


def quantile(q: float, counts: list[int]) -> float | None:
    """The ``q`` quantile of a TTFT histogram, interpolated within its bucket (as PromQL's
    ``histogram_quantile``); None without observations."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if seen + count >= rank and count:
            low = TTFT_BUCKETS[i - 1] if i else 0.0
            if i >= len(TTFT_BUCKETS):
                return TTFT_BUCKETS[-1]  # above the largest bound: say the bound
            return low + (TTFT_BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return TTFT_BUCKETS[-1]


@dataclass
class AnswerFigures:
    """What the history keeps of one answer."""

    network_id: str
    model_id: str
    prompt_tokens: int
    completion_tokens: int
    decode_steps: int
    decode_s: float
    ttft_s: float
    user_id: int | None = None
    key_id: int | None = None
    node_compute_ms: dict[str, tuple[int, float]] = field(default_factory=dict)  # steps, ms
    # per node: ms its decode steps waited there, and its link's ping (samples, ms summed)
    node_wait_ms: dict[str, float] = field(default_factory=dict)
    node_link_ms: dict[str, tuple[int, float]] = field(default_factory=dict)
    transit_ms: float = 0.0  # the decode steps' time between nodes, summed
    config_version: int = 0  # the plan the answer ran on (0: not known)
    time: float = field(default_factory=time.time)


class HistoryStore:
    def __init__(self, data_dir: Path, *, clock=time.time) -> None:
        self.db = Database.open(Path(data_dir))
        self.db.migrate(COMPONENT, MIGRATIONS)
        self.clock = clock

    def close(self) -> None:
        self.db.close()

    # --- writing -----------------------------------------------------------------------------

    def record_answer(self, answer: AnswerFigures) -> None:
        start = int(answer.time // HOUR_S * HOUR_S)
        key = (
            start,
            HOUR_S,
            answer.network_id,
            answer.model_id,
            answer.user_id or NO_ONE,
            answer.key_id or NO_ONE,
        )
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT ttft_buckets FROM usage_history WHERE start = ? AND span_s = ?"
                " AND network_id = ? AND model_id = ? AND user_id = ? AND key_id = ?",
                key,
            ).fetchone()
            buckets = ttft_histogram(answer.ttft_s)
            if row is not None:
                buckets = [a + b for a, b in zip(json.loads(row[0]), buckets, strict=True)]
            sums = (
                1,
                answer.prompt_tokens,
                answer.completion_tokens,
                answer.decode_steps,
                answer.decode_s,
                answer.ttft_s,
                answer.transit_ms,
            )
            _upsert(conn, "usage_history", key, USAGE_SUMS, sums, {"ttft_buckets": buckets})
            for node_id, (steps, ms) in answer.node_compute_ms.items():
                node_key = (start, HOUR_S, answer.network_id, node_id)
                _upsert(conn, "node_history", node_key, ("steps", "compute_ms"), (steps, ms))
                pings, link_ms = answer.node_link_ms.get(node_id, (0, 0.0))
                sums = (steps, ms, answer.node_wait_ms.get(node_id, 0.0), link_ms, pings)
                hop_key = (*node_key, answer.config_version)
                _upsert(conn, "hop_history", hop_key, HOP_SUMS, sums)

    def record_nodes(self, network_id: str, nodes: dict[str, dict], now: float | None = None):
        """One heartbeat sample of each node of a network (the admin's view): ``{node_id:
        {state, cpu_percent, ram_total_bytes, ram_free_bytes, kv_pages_used,
        kv_pages_total}}``."""
        now = self.clock() if now is None else now
        start = int(now // HOUR_S * HOUR_S)
        with self.db.transaction() as conn:
            for node_id, node in nodes.items():
                total = node.get("ram_total_bytes") or 0
                ram = 1 - (node.get("ram_free_bytes") or 0) / total if total else 0.0
                pages = node.get("kv_pages_total") or 0
                kv = (node.get("kv_pages_used") or 0) / pages if pages else 0.0
                sums = (
                    1,
                    int(node.get("state") == "online"),
                    node.get("cpu_percent") or 0,
                    ram,
                    kv,
                )
                _upsert(
                    conn,
                    "node_history",
                    (start, HOUR_S, network_id, node_id),
                    ("samples", "online", "cpu_sum", "ram_used_sum", "kv_used_sum"),
                    sums,
                )

    def compact(self, now: float | None = None) -> int:
        """Fold hourly rows older than ``HOURLY_DAYS`` into daily rows; drop rows older than
        ``KEEP_DAYS``. Returns how many rows went."""
        now = self.clock() if now is None else now
        cutoff = int((now - HOURLY_DAYS * DAY_S) // DAY_S * DAY_S)
        gone = 0
        with self.db.transaction() as conn:
            for table, sums in (
                ("usage_history", USAGE_SUMS),
                ("node_history", NODE_SUMS),
                ("hop_history", HOP_SUMS),
            ):
                keys = KEYS[table][2:]
                rows = conn.execute(
                    f"SELECT * FROM {table} WHERE span_s = ? AND start < ?", (HOUR_S, cutoff)
                ).fetchall()
                days: dict[tuple, dict] = defaultdict(dict)
                for row in rows:
                    day = days[(row["start"] // DAY_S * DAY_S, *(row[k] for k in keys))]
                    for name in sums:
                        day[name] = day.get(name, 0) + row[name]
                    if table == "usage_history":
                        old = day.get("ttft_buckets") or [0] * (len(TTFT_BUCKETS) + 1)
                        new = json.loads(row["ttft_buckets"])
                        day["ttft_buckets"] = [a + b for a, b in zip(old, new, strict=True)]
                for (start, *rest), day in days.items():
                    extra = (
                        {"ttft_buckets": day.pop("ttft_buckets")} if "ttft_buckets" in day else {}
                    )
                    if extra:
                        extra["ttft_buckets"] = _merged_buckets(conn, start, rest, extra)
                    _upsert(
                        conn, table, (start, DAY_S, *rest), tuple(day), tuple(day.values()), extra
                    )
                conn.execute(
                    f"DELETE FROM {table} WHERE span_s = ? AND start < ?", (HOUR_S, cutoff)
                )
                gone += len(rows)
                done = conn.execute(
                    f"DELETE FROM {table} WHERE start < ?", (int(now - KEEP_DAYS * DAY_S),)
                )
                gone += done.rowcount
        return gone

    # --- reading -----------------------------------------------------------------------------

    def usage(self, since: float, until: float) -> list[dict]:
        return self._rows("usage_history", since, until)

    def nodes(self, since: float, until: float) -> list[dict]:
        return self._rows("node_history", since, until)

    def hops(self, since: float, until: float) -> list[dict]:
        return self._rows("hop_history", since, until)

    def _rows(self, table: str, since: float, until: float) -> list[dict]:
        """Rows whose period overlaps [since, until) (an hour or day counts whole)."""
        rows = self.db.query(
            f"SELECT * FROM {table} WHERE start + span_s > ? AND start < ? ORDER BY start",
            (since, until),
        )
        found = []
        for row in rows:
            item = dict(row)
            if "ttft_buckets" in item:
                item["ttft_buckets"] = json.loads(item["ttft_buckets"])
            found.append(item)
        return found


def _merged_buckets(conn, start: int, rest: list, extra: dict) -> list[int]:
    """A daily row's TTFT histogram plus the one already there (compacted twice)."""
    row = conn.execute(
        "SELECT ttft_buckets FROM usage_history WHERE start = ? AND span_s = ?"
        " AND network_id = ? AND model_id = ? AND user_id = ? AND key_id = ?",
        (start, DAY_S, *rest),
    ).fetchone()
    if row is None:
        return extra["ttft_buckets"]
    return [a + b for a, b in zip(json.loads(row[0]), extra["ttft_buckets"], strict=True)]


def _upsert(
    conn,
    table: str,
    key: tuple,
    names: Iterable[str],
    values: Iterable,
    replace: dict | None = None,
) -> None:
    """Add ``values`` to the row ``key`` (made when missing); set the ``replace`` columns."""
    names, values = list(names), list(values)
    key_names = KEYS[table]
    replace = {k: json.dumps(v) for k, v in (replace or {}).items()}
    columns = [*key_names, *names, *replace]
    placeholders = ", ".join("?" for _ in columns)
    updates = [f"{n} = {n} + excluded.{n}" for n in names]
    updates += [f"{n} = excluded.{n}" for n in replace]
    conn.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"
        f" ON CONFLICT({', '.join(key_names)}) DO UPDATE SET {', '.join(updates)}",
        (*key, *values, *replace.values()),
    )
