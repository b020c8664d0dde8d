"""``/admin/events``: alerts (what needs the admin now) and the event log, newest first,
refreshed while the page is open."""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import (
    LEVEL_COLORS,
    WIDE,
    admin_frame,
    attempt,
    data_table,
    section,
    state_text,
)
from tiktrue.ui.i18n import N_, _, fmt_datetime, isolate, translate

REFRESH_S = 5.0
LOG = "tt-log"  # text of the event log: left-to-right, as the nodes wrote it
SHOWN = 200
COLUMNS = [
    {"name": "time", "label": N_("Time"), "field": "time", "align": "left"},
    {"name": "level", "label": N_("Level"), "field": "level", "align": "left"},
    # the log's own words (event codes, the nodes' English), kept as written: tt-log
    {"name": "event", "label": N_("Event"), "field": "event", "align": "left", "classes": LOG},
    {"name": "node", "label": N_("Node"), "field": "node", "align": "left", **WIDE},
    {
        "name": "details",
        "label": N_("Details"),
        "field": "details",
        "align": "left",
        "classes": LOG,
    },
]
KNOWN = {"ts", "time", "event", "level", "network_id", "node_id", "message", "at"}


def _row(index: int, event: dict) -> dict:
    when = fmt_datetime(event.get("time") or 0)
    details = translate(event.get("message") or event.get("why") or "")
    extra = ", ".join(f"{k}={v}" for k, v in event.items() if k not in KNOWN | {"why"})
    return {
        "id": index,
        "time": when,
        "level": state_text(event.get("level")),
        "event": event.get("event", "?"),
        "node": event.get("node_id") or "-",
        "details": "; ".join(p for p in (details, extra) if p),
    }


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/events")
    def events_page(network: str | None = None) -> None:
        with admin_frame("events", network) as allowed:
            if not allowed:
                return
            section(_("Alerts"))
            alerts = ui.column().classes("w-full gap-2")
            with ui.row().classes("w-full items-center gap-2"):
                ui.label(_("Event log")).classes("tt-section grow")
                label = _("Warnings and errors only")
                only = ui.switch(label).props(f'aria-label="{label}"')
            table = data_table(COLUMNS, "id", _("No events yet"), pagination=25)

            async def refresh() -> None:
                found = await attempt(ops.alerts(network))
                if found is None:
                    return
                alerts.clear()
                with alerts:
                    if not found:
                        with ui.row().classes("tt-card w-full p-3 items-center gap-2"):
                            ui.icon("check_circle", color="positive")
                            ui.label(_("Nothing needs you now."))
                    for alert in found[:10]:
                        color = LEVEL_COLORS.get(alert["level"], "grey")
                        with ui.row().classes("tt-card w-full p-3 items-center gap-2 no-wrap"):
                            ui.icon("warning", color=color)
                            row = _row(0, alert)
                            text = row["details"] or row["event"]
                            if alert["event"] != "alert":  # an event of the log
                                text = f"{row['event']}: {text}"
                            where = f"{alert.get('network_id') or ''} {row['node']}".strip()
                            with ui.column().classes("gap-0 min-w-0"):
                                logged = alert["event"] != "alert"  # else made here, translated
                                ui.label(text).classes(
                                    "break-words" + (f" {LOG}" if logged else "")
                                )
                                when = f"{isolate(row['time'])} · {isolate(where)}"
                                ui.label(when).classes("tt-muted text-xs")
                events = ops.events(network, SHOWN)
                if only.value:
                    events = [e for e in events if e.get("level") in LEVEL_COLORS]
                table.update_rows([_row(i, e) for i, e in enumerate(events)])

            only.on_value_change(refresh)
            ui.timer(0.05, refresh, once=True)
            ui.timer(REFRESH_S, refresh)
