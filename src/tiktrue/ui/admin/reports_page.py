"""``/admin/reports``: the node's performance report (the same as ``tiktrue report``) for a
window the admin picks: charts (SVG, drawn on this node) and tables in the admin's language
(``report_view``), and the report to download as HTML or CSV (the CLI's English files)."""

from __future__ import annotations

import asyncio
import time

from nicegui import ui

from tiktrue.gateway.reporting import node_report
from tiktrue.monitoring.reports import render_csv, render_html
from tiktrue.ui import i18n
from tiktrue.ui.admin import report_view
from tiktrue.ui.admin.widgets import admin_frame, attempt, data_table, section
from tiktrue.ui.i18n import N_, _, translate

WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
WINDOW_LABELS = {
    "1h": N_("Last hour"),
    "24h": N_("Last 24 hours"),
    "7d": N_("Last 7 days"),
    "30d": N_("Last 30 days"),
}
LOG = "tt-log"  # the nodes' own words in a table (what a failover did)


def _drawn(report, language: i18n.Language) -> dict[str, str]:
    """The charts in ``language`` (pygal draws in a worker thread, for nobody's page)."""
    with i18n.using(language):
        return report_view.charts(report)


def register(context) -> None:
    @ui.page("/admin/reports")
    def reports_page(network: str | None = None, window: str = "24h") -> None:
        with admin_frame("reports", network) as allowed:
            if not allowed:
                return
            language = i18n.current()
            chosen = window if window in WINDOWS else "24h"
            with ui.row().classes("w-full items-center gap-2"):
                ui.label(_("Performance report")).classes("tt-section grow")
                label = _("Window")
                picker = ui.select(
                    {key: translate(text) for key, text in WINDOW_LABELS.items()},
                    value=chosen,
                    label=label,
                ).props(f'dense outlined aria-label="{label}"')
                buttons = {}
                for kind in ("html", "csv"):
                    text = _("{format} file", format=kind.upper())
                    buttons[kind] = ui.button(text, icon="download").props(
                        f'flat no-caps aria-label="{text}"'
                    )
            body = ui.column().classes("w-full gap-3")
            shown: dict = {}

            async def load() -> None:
                since = time.time() - WINDOWS[picker.value]
                report = await attempt(asyncio.to_thread(node_report, context.data_dir, since))
                if report is None:
                    return
                shown["report"] = report
                drawn = await asyncio.to_thread(_drawn, report, language)
                body.clear()
                with body:
                    if not drawn:
                        with ui.row().classes("tt-card w-full p-3 items-center gap-2"):
                            ui.icon("info", color="primary")
                            ui.label(_("No answers in this window yet."))
                    with ui.element("div").classes("tt-grid"):
                        for title, svg in drawn.items():
                            with (
                                ui.column()
                                .classes("tt-card p-2 gap-0")
                                .props(f'role="figure" aria-label="{title}"')
                            ):
                                ui.html(svg, sanitize=False).classes("w-full")
                    for title, header, rows in report_view.tables(report):
                        section(title)
                        columns = [
                            {"name": str(i), "label": h, "field": str(i), "align": "left"}
                            | ({"classes": LOG} if h is report_view.WHAT_HAPPENED else {})
                            for i, h in enumerate(header)
                        ]
                        table = data_table(columns, "id", _("Nothing in this window"))
                        table.update_rows(
                            [
                                {"id": n, **{str(i): c for i, c in enumerate(row)}}
                                for n, row in enumerate(rows)
                            ]
                        )

            def download(kind: str) -> None:
                report = shown.get("report")
                if report is None:
                    return
                render = render_html if kind == "html" else render_csv
                ui.download.content(render(report), f"tiktrue-report.{kind}")

            for kind, button in buttons.items():
                button.on_click(lambda k=kind: download(k))
            picker.on_value_change(load)
            ui.timer(0.05, load, once=True)
