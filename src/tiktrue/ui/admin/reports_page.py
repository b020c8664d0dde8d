"""``/admin/reports``: the node's performance report (the same as ``tiktrue report``) for a
window the admin picks: charts (SVG, drawn on this node) and tables, and the report to
download as HTML or CSV."""

from __future__ import annotations

import asyncio
import time

from nicegui import ui

from tiktrue.gateway.reporting import node_report
from tiktrue.monitoring.reports import charts, render_csv, render_html, tables
from tiktrue.ui.admin.widgets import admin_frame, attempt, data_table, section

WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
WINDOW_LABELS = {
    "1h": "Last hour",
    "24h": "Last 24 hours",
    "7d": "Last 7 days",
    "30d": "Last 30 days",
}


def register(context) -> None:
    @ui.page("/admin/reports")
    def reports_page(network: str | None = None, window: str = "24h") -> None:
        with admin_frame("reports", network) as allowed:
            if not allowed:
                return
            chosen = window if window in WINDOWS else "24h"
            with ui.row().classes("w-full items-center gap-2"):
                ui.label("Performance report").classes("tt-section grow")
                picker = ui.select(WINDOW_LABELS, value=chosen, label="Window").props(
                    'dense outlined aria-label="Window"'
                )
                html_button = ui.button("HTML", icon="download").props("flat no-caps")
                csv_button = ui.button("CSV", icon="download").props("flat no-caps")
            body = ui.column().classes("w-full gap-3")
            shown: dict = {}

            async def load() -> None:
                since = time.time() - WINDOWS[picker.value]
                report = await attempt(asyncio.to_thread(node_report, context.data_dir, since))
                if report is None:
                    return
                shown["report"] = report
                drawn = await asyncio.to_thread(charts, report)
                body.clear()
                with body:
                    if not drawn:
                        with ui.row().classes("tt-card w-full p-3 items-center gap-2"):
                            ui.icon("info", color="primary")
                            ui.label("No answers in this window yet.")
                    with ui.element("div").classes("tt-grid"):
                        for title, svg in drawn.items():
                            with (
                                ui.column()
                                .classes("tt-card p-2 gap-0")
                                .props(f'role="figure" aria-label="{title}"')
                            ):
                                ui.html(svg, sanitize=False).classes("w-full")
                    for title, header, rows in tables(report):
                        section(title)
                        columns = [
                            {"name": str(i), "label": h, "field": str(i), "align": "left"}
                            for i, h in enumerate(header)
                        ]
                        table = data_table(columns, "id", "Nothing in this window")
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

            html_button.on_click(lambda: download("html"))
            csv_button.on_click(lambda: download("csv"))
            picker.on_value_change(load)
            ui.timer(0.05, load, once=True)
