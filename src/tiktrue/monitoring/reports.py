"""Performance reports (seed ``generate_performance_reports``): what the history holds for a
time window, as text, CSV or an HTML page with charts (the dashboard's Reports page shows the
same charts).

A report has: tokens and tokens/s per network and per PC, time to first token (p50, p95) per
network, failovers with the pause each cost (from the event log), uptime per PC (the share
of the admin's heartbeat samples that found it online), usage per account and key, thumbs
up/down per model, and the busiest hours of the day. Charts are SVG (pygal), inline, so the
HTML file and the page need nothing from the internet.
"""

from __future__ import annotations

import csv
import html
import io
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import pygal
from pygal.style import Style

from tiktrue.monitoring.history import HistoryStore, quantile

SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL | re.IGNORECASE)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
STYLE = Style(
    background="transparent",
    plot_background="transparent",
    colors=("#4f46e5", "#f59e0b", "#10b981", "#ef4444", "#6366f1", "#0ea5e9"),
    font_family="system-ui, sans-serif",
    title_font_size=22,
    label_font_size=16,
    major_label_font_size=16,
    legend_font_size=16,
    value_font_size=16,
)


def parse_since(text: str, now: float | None = None) -> float:
    """``1h``, ``30m``, ``7d``, ``2w`` before now, or an ISO date/time; the start, as epoch
    seconds. Raises ValueError with what is accepted."""
    now = time.time() if now is None else now
    text = text.strip()
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if found:
        return now - float(found[1]) * UNITS[found[2]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"--since {text!r}: say how long ago (30m, 1h, 7d, 2w) or a date (2026-12-01)"
        ) from None


@dataclass
class Report:
    since: float
    until: float
    networks: list[dict] = field(default_factory=list)  # network, model, answers, tokens, ...
    nodes: list[dict] = field(default_factory=list)  # network, node, steps, tokens/s, uptime
    usage: list[dict] = field(default_factory=list)  # who, answers, prompt/completion tokens
    failovers: list[dict] = field(default_factory=list)  # time, network, node, done, pause_s
    ratings: list[dict] = field(default_factory=list)  # model, up, down
    hours: list[int] = field(default_factory=lambda: [0] * 24)  # answers per hour of day

    @property
    def generated_tokens(self) -> int:
        return sum(n["completion_tokens"] for n in self.networks)


def build_report(
    history: HistoryStore,
    since: float,
    until: float | None = None,
    *,
    events: list[dict] = (),
    names: dict[str, str] | None = None,
    ratings: dict[str, tuple[int, int]] | None = None,
) -> Report:
    """``events``: the event log (failovers); ``names``: ``user:<id>``/``key:<id>`` -> what
    a person calls them; ``ratings``: model -> (thumbs up, thumbs down) in the window."""
    until = time.time() if until is None else until
    names = names or {}
    report = Report(since, until)
    per_network: dict[tuple, dict] = {}
    per_who: dict[str, dict] = {}
    for row in history.usage(since, until):
        net = per_network.setdefault(
            (row["network_id"], row["model_id"]),
            {"network": row["network_id"], "model": row["model_id"], "buckets": None}
            | dict.fromkeys(("answers", "prompt_tokens", "completion_tokens"), 0)
            | {"decode_steps": 0, "decode_s": 0.0},
        )
        for name in ("answers", "prompt_tokens", "completion_tokens", "decode_steps", "decode_s"):
            net[name] += row[name]
        buckets = row["ttft_buckets"]
        net["buckets"] = (
            buckets
            if net["buckets"] is None
            else [a + b for a, b in zip(net["buckets"], buckets, strict=True)]
        )
        who = _who(row, names)
        entry = per_who.setdefault(
            who, {"who": who, "answers": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        for name in ("answers", "prompt_tokens", "completion_tokens"):
            entry[name] += row[name]
        if row["span_s"] == 3600:
            hour = datetime.fromtimestamp(row["start"]).hour
            report.hours[hour] += row["answers"]
    for net in per_network.values():
        buckets = net.pop("buckets") or []
        net["tokens_per_s"] = net["decode_steps"] / net["decode_s"] if net["decode_s"] else None
        net["ttft_p50_s"] = quantile(0.5, buckets)
        net["ttft_p95_s"] = quantile(0.95, buckets)
        report.networks.append(net)
    report.networks.sort(key=lambda n: (n["network"], n["model"]))
    report.usage = sorted(per_who.values(), key=lambda u: -u["completion_tokens"])
    per_node: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    for row in history.nodes(since, until):
        node = per_node[(row["network_id"], row["node_id"])]
        for name in ("steps", "compute_ms", "samples", "online", "cpu_sum"):
            node[name] += row[name]
    for (network_id, node_id), node in sorted(per_node.items()):
        ms_per_token = node["compute_ms"] / node["steps"] if node["steps"] else None
        report.nodes.append(
            {
                "network": network_id,
                "node": node_id,
                "steps": int(node["steps"]),
                "compute_ms_per_token": ms_per_token,
                "tokens_per_s": 1000 / ms_per_token if ms_per_token else None,
                "uptime": node["online"] / node["samples"] if node["samples"] else None,
                "cpu_percent": node["cpu_sum"] / node["samples"] if node["samples"] else None,
            }
        )
    report.failovers = failovers(events, since, until)
    report.ratings = [
        {"model": model, "up": up, "down": down}
        for model, (up, down) in sorted((ratings or {}).items())
    ]
    return report


def _who(row: dict, names: dict[str, str]) -> str:
    user, key = row["user_id"], row["key_id"]
    if not user:
        return "without an account"
    who = names.get(f"user:{user}", f"account {user}")
    return f"{who} / {names.get(f'key:{key}', f'key {key}')}" if key else f"{who} (logged in)"


def failovers(events: list[dict], since: float, until: float) -> list[dict]:
    """Each ``failover`` event in the window, with its pause: from the node's first
    ``node_suspect``/``node_dead`` before it."""
    found, suspected = [], {}
    for event in sorted(events, key=lambda e: e.get("time") or 0):
        key = (event.get("network_id"), event.get("node_id"))
        name, when = event.get("event"), event.get("time") or 0
        if name in ("node_suspect", "node_dead"):
            suspected.setdefault(key, when)
        elif name == "node_online":
            suspected.pop(key, None)
        elif name == "failover":
            began = suspected.pop(key, None)
            if since <= when < until:
                found.append(
                    {
                        "time": when,
                        "network": key[0],
                        "node": key[1],
                        "done": event.get("done", ""),
                        "pause_s": None if began is None else max(0.0, when - began),
                    }
                )
    return found


# --- rendering -------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: the text, CSV and HTML forms share them."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    return [
        (
            "Tokens per network",
            [
                "network",
                "model",
                "answers",
                "prompt tokens",
                "generated tokens",
                "tokens/s",
                "TTFT p50",
                "TTFT p95",
            ],
            [
                [
                    n["network"],
                    n["model"],
                    str(n["answers"]),
                    str(n["prompt_tokens"]),
                    str(n["completion_tokens"]),
                    _fmt(n["tokens_per_s"]),
                    ms(n["ttft_p50_s"]),
                    ms(n["ttft_p95_s"]),
                ]
                for n in report.networks
            ],
        ),
        (
            "Per PC",
            ["network", "node", "tokens", "compute ms/token", "tokens/s", "uptime", "CPU"],
            [
                [
                    n["network"],
                    n["node"],
                    str(n["steps"]),
                    _fmt(n["compute_ms_per_token"], 2),
                    _fmt(n["tokens_per_s"]),
                    pct(n["uptime"]),
                    "-" if n["cpu_percent"] is None else f"{n['cpu_percent']:.0f}%",
                ]
                for n in report.nodes
            ],
        ),
        (
            "Usage per account and key",
            ["who", "answers", "prompt tokens", "generated tokens"],
            [
                [u["who"], str(u["answers"]), str(u["prompt_tokens"]), str(u["completion_tokens"])]
                for u in report.usage
            ],
        ),
        (
            "Failovers",
            ["time", "network", "node", "what happened", "pause"],
            [
                [
                    _when(f["time"]),
                    str(f["network"]),
                    str(f["node"]),
                    f["done"],
                    "-" if f["pause_s"] is None else f"{f['pause_s']:.1f} s",
                ]
                for f in report.failovers
            ],
        ),
        (
            "Thumbs per model",
            ["model", "up", "down"],
            [[r["model"], str(r["up"]), str(r["down"])] for r in report.ratings],
        ),
        (
            "Busiest hours",
            ["hour", "answers"],
            [[f"{h:02d}:00", str(c)] for h, c in enumerate(report.hours) if c],
        ),
    ]


def render_text(report: Report) -> str:
    out = [f"TikTrue report: {_when(report.since)} to {_when(report.until)}", ""]
    for title, header, rows in tables(report):
        out.append(title)
        if not rows:
            out += ["  (nothing in this window)", ""]
            continue
        widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
        for line in [header, *rows]:
            out.append(
                "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            )
        out.append("")
    return "\n".join(out)


def render_csv(report: Report) -> str:
    """One CSV: a ``section`` column, then each table's own columns (a blank line between)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["section", "since", _when(report.since), "until", _when(report.until)])
    for title, header, rows in tables(report):
        writer.writerow([])
        writer.writerow(["section", *header])
        for row in rows:
            writer.writerow([title, *row])
    return buffer.getvalue()


def charts(report: Report) -> dict[str, str]:
    """Title -> an SVG chart (inline, no scripts)."""
    config = {
        "style": STYLE,
        "js": [],
        "disable_xml_declaration": True,
        "width": 640,
        "height": 380,
        "show_legend": True,
        "legend_at_bottom": True,
        "print_values": False,
    }
    found = {}

    def bar(title: str, series: dict[str, list], labels: list[str], horizontal=False) -> None:
        if not labels:
            return
        chart = (pygal.HorizontalBar if horizontal else pygal.Bar)(**config, title=title)
        chart.x_labels = labels
        for name, values in series.items():
            chart.add(name, values)
        # pygal always adds its tooltip config as a <script>: static charts need none
        found[title] = SCRIPT.sub("", chart.render(is_unicode=True))

    nets = [f"{n['network']} ({n['model']})" for n in report.networks]
    bar(
        "Generated tokens per network",
        {"tokens": [n["completion_tokens"] for n in report.networks]},
        nets,
    )
    bar(
        "Tokens per second per network",
        {"tokens/s": [n["tokens_per_s"] for n in report.networks]},
        nets,
    )
    bar(
        "Time to first token (ms)",
        {
            "p50": [
                None if n["ttft_p50_s"] is None else 1000 * n["ttft_p50_s"] for n in report.networks
            ],
            "p95": [
                None if n["ttft_p95_s"] is None else 1000 * n["ttft_p95_s"] for n in report.networks
            ],
        },
        nets,
    )
    pcs = [f"{n['node'][:12]} ({n['network']})" for n in report.nodes]
    bar(
        "Tokens per second per PC (its compute)",
        {"tokens/s": [n["tokens_per_s"] for n in report.nodes]},
        pcs,
        horizontal=True,
    )
    bar(
        "Uptime per PC (%)",
        {"uptime": [None if n["uptime"] is None else 100 * n["uptime"] for n in report.nodes]},
        pcs,
        horizontal=True,
    )
    bar(
        "Generated tokens per account and key",
        {"tokens": [u["completion_tokens"] for u in report.usage]},
        [u["who"] for u in report.usage],
        horizontal=True,
    )
    bar(
        "Thumbs per model",
        {"up": [r["up"] for r in report.ratings], "down": [r["down"] for r in report.ratings]},
        [r["model"] for r in report.ratings],
    )
    if any(report.hours):
        bar("Busiest hours (answers)", {"answers": report.hours}, [f"{h:02d}" for h in range(24)])
    if report.failovers:
        bar(
            "Failover pauses (s)",
            {"pause": [f["pause_s"] for f in report.failovers]},
            [f"{_when(f['time'])} {f['node'][:8] if f['node'] else ''}" for f in report.failovers],
        )
    return found


def render_html(report: Report) -> str:
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>TikTrue report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2rem;color:#111}",
        "table{border-collapse:collapse;margin:0.5rem 0 1.5rem}",
        "td,th{border:1px solid #ddd;padding:0.25rem 0.6rem;text-align:left}",
        ".charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1rem}",
        "</style></head><body>",
        f"<h1>TikTrue report</h1><p>{_when(report.since)} to {_when(report.until)}</p>",
        "<div class='charts'>",
    ]
    for title, svg in charts(report).items():
        parts.append(f"<figure aria-label='{html.escape(title)}'>{svg}</figure>")
    parts.append("</div>")
    for title, header, rows in tables(report):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if not rows:
            parts.append("<p>Nothing in this window.</p>")
            continue
        parts.append(
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
        )
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
