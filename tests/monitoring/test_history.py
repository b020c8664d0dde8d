"""The history in the node's SQLite file: answers and node samples as hourly sums, folded into
days and dropped when old; the report built from it (real SQLite, a clock we move)."""

from __future__ import annotations

import pytest

from tiktrue.monitoring.history import (
    DAY_S,
    HOURLY_DAYS,
    KEEP_DAYS,
    AnswerFigures,
    HistoryStore,
    quantile,
    ttft_histogram,
)
from tiktrue.monitoring.reports import (
    build_report,
    parse_since,
    render_csv,
    render_html,
    render_text,
)

T0 = 1_800_000_000.0 // DAY_S * DAY_S  # a UTC midnight


def answer(at: float, ttft: float, tokens: int = 10, user=1, key=2) -> AnswerFigures:
    return AnswerFigures(
        "net",
        "m",
        prompt_tokens=5,
        completion_tokens=tokens,
        decode_steps=tokens - 1,
        decode_s=(tokens - 1) * 0.05,
        ttft_s=ttft,
        user_id=user,
        key_id=key,
        node_compute_ms={"n1": (tokens - 1, 4.0 * (tokens - 1))},
        time=at,
    )


def test_percentiles_from_the_histogram_are_those_of_the_answers():
    counts = [a + b for a, b in zip(ttft_histogram(0.2), ttft_histogram(0.3), strict=True)]
    for _ in range(8):
        counts = [a + b for a, b in zip(counts, ttft_histogram(0.6), strict=True)]
    assert 0.1 < quantile(0.1, counts) <= 0.25
    assert 0.5 < quantile(0.5, counts) <= 0.75
    assert quantile(0.5, [0] * len(counts)) is None


def test_answers_and_samples_become_a_report(tmp_path):
    store = HistoryStore(tmp_path)
    for i in range(4):
        store.record_answer(answer(T0 + 3600 + i, ttft=0.3, tokens=10))
    store.record_answer(answer(T0 + 7200, ttft=4.0, tokens=20, user=None, key=None))
    online = {"state": "online", "cpu_percent": 50, "ram_total_bytes": 100, "ram_free_bytes": 40}
    store.record_nodes("net", {"n1": online}, now=T0 + 3600)
    store.record_nodes("net", {"n1": {**online, "state": "dead"}}, now=T0 + 3660)
    events = [
        {"event": "node_suspect", "network_id": "net", "node_id": "n2", "time": T0 + 3000},
        {
            "event": "failover",
            "network_id": "net",
            "node_id": "n2",
            "time": T0 + 3002.5,
            "done": "backup took over",
        },
    ]
    report = build_report(
        store,
        T0,
        T0 + DAY_S,
        events=events,
        names={"user:1": "ann", "key:2": "laptop"},
        ratings={"m": (3, 1)},
    )
    (net,) = report.networks
    assert net["completion_tokens"] == report.generated_tokens == 60
    assert net["answers"] == 5 and net["tokens_per_s"] == pytest.approx(20.0)
    assert net["ttft_p50_s"] <= 0.5 < 2.5 < net["ttft_p95_s"]
    (node,) = report.nodes
    assert node["uptime"] == 0.5 and node["compute_ms_per_token"] == 4.0
    assert {u["who"]: u["completion_tokens"] for u in report.usage} == {
        "ann / laptop": 40,
        "without an account": 20,
    }
    assert report.failovers[0]["pause_s"] == 2.5
    text = render_text(report)
    assert "ann / laptop" in text and "2.5 s" in text and "backup took over" in text
    assert "Thumbs per model,m,3,1" in render_csv(report)
    page = render_html(report)
    assert page.count("<svg") >= 5 and "<script" not in page  # static, nothing to fetch
    assert build_report(store, T0 + 2 * DAY_S, T0 + 3 * DAY_S).generated_tokens == 0


def test_old_hours_fold_into_days_and_old_days_go(tmp_path):
    store = HistoryStore(tmp_path)
    old = T0 - (HOURLY_DAYS + 2) * DAY_S
    store.record_answer(answer(old + 3600, ttft=0.3))
    store.record_answer(answer(old + 7200, ttft=0.6))
    store.record_answer(answer(T0 - (KEEP_DAYS + 5) * DAY_S, ttft=0.3))
    store.record_answer(answer(T0, ttft=0.3))
    before = build_report(store, old, old + DAY_S)
    store.compact(now=T0)
    rows = store.usage(old, old + DAY_S)
    assert [(r["span_s"], r["answers"]) for r in rows] == [(DAY_S, 2)]
    after = build_report(store, old, old + DAY_S)
    assert after.networks == before.networks  # the same figures, p95 included
    assert not store.usage(0, T0 - KEEP_DAYS * DAY_S)  # dropped
    assert store.usage(T0, T0 + 3600)  # recent hours stay
    store.compact(now=T0)  # again: nothing changes
    assert [r["answers"] for r in store.usage(old, old + DAY_S)] == [2]


def test_since_takes_durations_and_dates():
    assert parse_since("1h", now=10_000.0) == 6400.0
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 2 * DAY_S
    assert parse_since("2026-12-01") > 0
    with pytest.raises(ValueError, match="30m, 1h, 7d"):
        parse_since("yesterday")
