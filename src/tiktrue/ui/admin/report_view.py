"""The performance report as the Reports page shows it: its tables and charts in the language
of the person reading it.

``monitoring.reports`` writes the report for ``tiktrue report`` and the files to download
(English: a log's and a spreadsheet's words). The page draws the same figures from the same
:class:`~tiktrue.monitoring.reports.Report`, with the same pygal style, but with its titles,
column names, series and axis numbers in the person's language (Persian digits in Persian),
dates in their calendar, and ids (networks, models, PCs) kept Latin (bidi isolates in a
right-to-left language).

In a right-to-left language a chart is mirrored, as the page is: its categories run from the
right, the value axis stands on the right and horizontal bars grow leftwards. The mirror is
CSS inside the SVG (the chart's group flipped, each text flipped back in place, so it reads
normally), measured on pygal's own layout, which assumes left-to-right geometry.
"""

from __future__ import annotations

import math
import re

import pygal
from pygal.style import Style

from tiktrue.monitoring.reports import SCRIPT, STYLE, Report
from tiktrue.ui import i18n
from tiktrue.ui.admin.widgets import fmt_ms
from tiktrue.ui.i18n import N_, Message, _, fmt_datetime, latin, localize_digits, translate

# The tables' titles; in English they are those of ``monitoring.reports`` (the CLI's and the
# file's), as are the charts' titles: a figure has one name wherever it is shown.
TITLES = {
    "networks": N_("Tokens per network"),
    "nodes": N_("Per PC"),
    "usage": N_("Usage per account and key"),
    "failovers": N_("Failovers"),
    "ratings": N_("Thumbs per model"),
    "hours": N_("Busiest hours"),
}
WHAT_HAPPENED = N_("What happened")  # a failover's column: the node's own words
LONGEST_ID = 24  # characters of an id in a chart's label (pygal does not cut an isolate well)
RTL_CSS = """
svg.tt-rtl { direction: ltr; }
svg.tt-rtl text { unicode-bidi: plaintext; }
svg.tt-rtl g.graph { transform: scaleX(-1); transform-box: view-box; transform-origin: 50% 50%; }
svg.tt-rtl g.graph text { transform: scaleX(-1); transform-box: fill-box;
                          transform-origin: 50% 50%; }
"""


def _count(value: int | None) -> str:
    return "-" if value is None else i18n.number(value, ",")


def _rate(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else i18n.number(value, f",.{digits}f")


def _percent(share: float | None) -> str:
    return "-" if share is None else _("{percent:.1f}%", percent=100 * share)


def _seconds(value: float | None) -> str:
    return "-" if value is None else _("{seconds:.1f} s", seconds=value)


def _ms(seconds: float | None) -> str:
    return fmt_ms(None if seconds is None else 1000 * seconds)


def _hour(hour: int) -> str:
    return localize_digits(f"{hour:02d}:00")


# --- who used the network: monitoring.reports._who's words, in the person's language ---------

_KEY = re.compile(r"(?P<account>.*) / key (?P<key>\S+)(?: (?P<name>.*))?")
_LOGGED_IN = re.compile(r"(?P<account>.*) \(logged in\)")
_ACCOUNT_ID = re.compile(r"account (?P<id>\S+)")


def _account(text: str) -> str:
    found = _ACCOUNT_ID.fullmatch(text)
    return _("account {id}", id=found["id"]) if found else text


def who_text(who: str) -> str:
    """``alice / key 7 ci-bot``, ``alice (logged in)``, ``without an account`` (how the
    report names who asked) in the person's language; the names stay as they were given."""
    if who == "without an account":
        return _("without an account")
    key = _KEY.fullmatch(who)
    if key:
        return _(
            "{account}, key {key}",
            account=_account(key["account"]),
            key=" ".join(p for p in (key["key"], key["name"]) if p),
        )
    logged_in = _LOGGED_IN.fullmatch(who)
    if logged_in:
        return _("{account} (logged in)", account=_account(logged_in["account"]))
    return _account(who)


# --- tables ----------------------------------------------------------------------------------


def tables(report: Report) -> list[tuple[str, list[Message], list[list[str]]]]:
    """The report's tables: (title, column labels, rows of texts) in the person's language."""
    return [
        (
            translate(TITLES["networks"]),
            [
                N_("Network"),
                N_("Model"),
                N_("Answers"),
                N_("Prompt tokens"),
                N_("Generated tokens"),
                N_("Tokens/s"),
                N_("TTFT p50"),
                N_("TTFT p95"),
            ],
            [
                [
                    latin(n["network"]),
                    latin(n["model"]),
                    _count(n["answers"]),
                    _count(n["prompt_tokens"]),
                    _count(n["completion_tokens"]),
                    _rate(n["tokens_per_s"]),
                    _ms(n["ttft_p50_s"]),
                    _ms(n["ttft_p95_s"]),
                ]
                for n in report.networks
            ],
        ),
        (
            translate(TITLES["nodes"]),
            [
                N_("Network"),
                N_("Node"),
                N_("Tokens"),
                N_("Compute ms/token"),
                N_("Tokens/s"),
                N_("Uptime"),
                N_("CPU"),
            ],
            [
                [
                    latin(n["network"]),
                    latin(n["node"]),
                    _count(n["steps"]),
                    _rate(n["compute_ms_per_token"], 2),
                    _rate(n["tokens_per_s"]),
                    _percent(n["uptime"]),
                    "-"
                    if n["cpu_percent"] is None
                    else _("{percent:.0f}%", percent=n["cpu_percent"]),
                ]
                for n in report.nodes
            ],
        ),
        (
            translate(TITLES["usage"]),
            [N_("Who"), N_("Answers"), N_("Prompt tokens"), N_("Generated tokens")],
            [
                [
                    who_text(u["who"]),
                    _count(u["answers"]),
                    _count(u["prompt_tokens"]),
                    _count(u["completion_tokens"]),
                ]
                for u in report.usage
            ],
        ),
        (
            translate(TITLES["failovers"]),
            [N_("Time"), N_("Network"), N_("Node"), WHAT_HAPPENED, N_("Pause")],
            [
                [
                    fmt_datetime(f["time"]),
                    latin(str(f["network"])),
                    latin(str(f["node"])),
                    f["done"],  # the node's own words (tt-log)
                    _seconds(f["pause_s"]),
                ]
                for f in report.failovers
            ],
        ),
        (
            translate(TITLES["ratings"]),
            [N_("Model"), N_("Thumbs up"), N_("Thumbs down")],
            [[latin(r["model"]), _count(r["up"]), _count(r["down"])] for r in report.ratings],
        ),
        (
            translate(TITLES["hours"]),
            [N_("Hour"), N_("Answers")],
            [[_hour(h), _count(c)] for h, c in enumerate(report.hours) if c],
        ),
    ]


# --- charts ----------------------------------------------------------------------------------


def _id(text: str) -> str:
    """An id in a chart's label: cut here (not by pygal, inside the isolate), isolated."""
    text = str(text)
    return latin(text if len(text) <= LONGEST_ID else text[: LONGEST_ID - 1] + "…")


def _axis_number(value: float) -> str:
    text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}".rstrip("0")
    return localize_digits(text)


def _config(lang: i18n.Language) -> dict:
    style = STYLE
    if lang.rtl:  # the page's Persian font first (Vazirmatn, served with the page)
        style = Style(**{**STYLE.to_dict(), "font_family": "Vazirmatn, system-ui, sans-serif"})
    config = {
        "style": style,
        "js": [],
        "disable_xml_declaration": True,
        "width": 640,
        "height": 380,
        "show_legend": True,
        "legend_at_bottom": True,
        "print_values": False,
        "max_scale": 8,  # value axis ticks: pygal's default (up to 16) crowd a horizontal axis
        "truncate_label": -1,  # ids are cut by _id, before they are isolated
        "truncate_legend": -1,
        "value_formatter": _axis_number,
        "no_data_text": _("No data"),
    }
    if lang.rtl:
        config["classes"] = ["pygal-chart", "tt-rtl"]
        config["css"] = ["file://style.css", "file://graph.css", "inline:" + RTL_CSS]
    return config


def charts(report: Report) -> dict[str, str]:
    """Title -> the SVG of a chart (inline, no scripts), in the current language."""
    config = _config(i18n.current())
    found: dict[str, str] = {}

    def bar(
        title: Message,
        series: dict[Message, list],
        labels: list[str],
        horizontal: bool = False,
        counts: bool = False,
    ) -> None:
        values = [v for column in series.values() for v in column if v is not None]
        if not labels or not values:  # nothing measured yet: no empty chart
            return
        text = translate(title)
        ticks = {"y_labels": _count_ticks(max(values))} if counts else {}
        chart = (pygal.HorizontalBar if horizontal else pygal.Bar)(**config, **ticks, title=text)
        chart.x_labels = labels
        for name, values in series.items():
            chart.add(translate(name), values)
        # pygal always adds its tooltip config as a <script>: static charts need none
        found[text] = SCRIPT.sub("", chart.render(is_unicode=True))

    nets = [f"{_id(n['network'])} ({_id(n['model'])})" for n in report.networks]
    bar(
        N_("Generated tokens per network"),
        {N_("tokens"): [n["completion_tokens"] for n in report.networks]},
        nets,
        counts=True,
    )
    bar(
        N_("Tokens per second per network"),
        {N_("tokens/s"): [n["tokens_per_s"] for n in report.networks]},
        nets,
    )
    bar(
        N_("Time to first token (ms)"),
        {
            N_("p50"): [_in_ms(n["ttft_p50_s"]) for n in report.networks],
            N_("p95"): [_in_ms(n["ttft_p95_s"]) for n in report.networks],
        },
        nets,
    )
    pcs = [f"{_id(n['node'][:12])} ({_id(n['network'])})" for n in report.nodes]
    bar(
        N_("Tokens per second per PC (its compute)"),
        {N_("tokens/s"): [n["tokens_per_s"] for n in report.nodes]},
        pcs,
        horizontal=True,
    )
    bar(
        N_("Uptime per PC (%)"),
        {N_("uptime"): [None if n["uptime"] is None else 100 * n["uptime"] for n in report.nodes]},
        pcs,
        horizontal=True,
    )
    bar(
        N_("Generated tokens per account and key"),
        {N_("tokens"): [u["completion_tokens"] for u in report.usage]},
        [who_text(u["who"]) for u in report.usage],
        horizontal=True,
        counts=True,
    )
    bar(
        N_("Thumbs per model"),
        {
            N_("up"): [r["up"] for r in report.ratings],
            N_("down"): [r["down"] for r in report.ratings],
        },
        [_id(r["model"]) for r in report.ratings],
        counts=True,
    )
    if any(report.hours):
        bar(
            N_("Busiest hours (answers)"),
            {N_("answers"): report.hours},
            [localize_digits(f"{h:02d}") for h in range(24)],
            counts=True,
        )
    if report.failovers:
        bar(
            N_("Failover pauses (s)"),
            {N_("pause"): [f["pause_s"] for f in report.failovers]},
            [f"{fmt_datetime(f['time'])} {_id((f['node'] or '')[:8])}" for f in report.failovers],
        )
    return found


def _count_ticks(top: float) -> list[int]:
    """Whole-number ticks from 0 to ``top`` or just past it, at most six: a count has no 0.1
    (pygal's own ticks for a count of 1 are 0, 0.1, ... 1)."""
    top = max(1, math.ceil(top))
    magnitude = 10 ** math.floor(math.log10(top / 5)) if top >= 5 else 1
    step = next(s * magnitude for s in (1, 2, 5, 10) if top <= 5 * s * magnitude)
    return list(range(0, -(-top // step) * step + 1, step))


def _in_ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds
