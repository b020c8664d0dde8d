"""The Reports page's tables and charts (``ui.admin.report_view``) against the CLI's report
(``monitoring.reports``): in English the same titles, in Persian every title translated, the
numbers in Persian digits and the charts mirrored; who asked, in the person's words."""

from __future__ import annotations

import re

import pytest

from tiktrue.monitoring import reports
from tiktrue.ui import i18n
from tiktrue.ui.admin import report_view

ISOLATES = re.compile("\u2068[^\u2069]*\u2069")


@pytest.fixture
def report() -> reports.Report:
    """A report with a figure in every table and chart (as build_report leaves them)."""
    made = reports.Report(since=1_764_000_000, until=1_764_086_400)
    made.networks = [
        {
            "network": "net-1a2b",
            "model": "tiny-llama-0",
            "answers": 3,
            "prompt_tokens": 42,
            "completion_tokens": 1234,
            "decode_steps": 1234,
            "decode_s": 20.5,
            "tokens_per_s": 60.2,
            "ttft_p50_s": 0.125,
            "ttft_p95_s": 0.5,
        }
    ]
    made.nodes = [
        {
            "network": "net-1a2b",
            "node": "ab12cd34ef56ab12",
            "steps": 1234,
            "compute_ms_per_token": 3.5,
            "tokens_per_s": 285.7,
            "uptime": 0.995,
            "cpu_percent": 42.0,
        }
    ]
    made.usage = [
        {
            "who": "alice / key 7 ci-bot",
            "answers": 2,
            "prompt_tokens": 30,
            "completion_tokens": 900,
        },
        {"who": "without an account", "answers": 1, "prompt_tokens": 12, "completion_tokens": 334},
    ]
    made.failovers = [
        {"time": 1_764_050_000, "network": "net-1a2b", "node": "ab12cd34ef56ab12",
         "done": "span moved to the backup", "pause_s": 1.25}
    ]  # fmt: skip
    made.ratings = [{"model": "tiny-llama-0", "up": 2, "down": 1}]
    made.hours[9] = 3
    return made


def test_in_english_the_titles_are_the_reports(report):
    with i18n.using(i18n.SOURCE):
        assert list(report_view.charts(report)) == list(reports.charts(report))
        assert [t for t, _h, _r in report_view.tables(report)] == [
            t for t, _h, _r in reports.tables(report)
        ]


def test_in_persian_words_and_digits_are_persian_and_charts_mirrored(report):
    with i18n.using(i18n.PERSIAN):
        drawn = report_view.charts(report)
        tables = report_view.tables(report)
        titles = list(drawn) + [t for t, _h, _r in tables]
        headers = [i18n.translate(h) for _t, header, _r in tables for h in header]
        cells = [c for _t, _h, rows in tables for row in rows for c in row]
    assert len(drawn) == len(reports.charts(report))
    for text in titles + headers:
        assert not re.search("[A-Za-z]", ISOLATES.sub("", text)), text
    for _title, svg in drawn.items():
        assert 'class="pygal-chart tt-rtl"' in svg
        shown = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
        assert re.search("[۰-۹]", "".join(shown)), shown
        assert not re.search("[0-9]", ISOLATES.sub("", "".join(shown))), shown
    # the failover's words are the node's own; every other cell is Persian digits or an id
    own = {"span moved to the backup"}
    for cell in cells:
        if cell not in own:
            assert not re.search("[0-9A-Za-z]", ISOLATES.sub("", cell)), cell
    assert "\u2068alice\u2069، کلید \u20687 ci-bot\u2069" in cells
    assert "بدون حساب" in cells


@pytest.mark.parametrize(
    ("top", "ticks"),
    [(0, [0, 1]), (1, [0, 1]), (7, [0, 2, 4, 6, 8]), (409, [0, 100, 200, 300, 400, 500])],
)
def test_a_count_gets_whole_ticks(top, ticks):
    assert report_view._count_ticks(top) == ticks  # noqa: SLF001
