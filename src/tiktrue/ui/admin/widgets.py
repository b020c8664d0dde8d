"""Pieces every admin page shares: the section nav, the network picker, the block map bars,
job progress, and how figures are written for people.

Widgets that change while a page is open (node health, job progress) keep references to
their elements and set only what changed: a timer never rebuilds a page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nicegui import ui

from tiktrue.control.planner import human_bytes
from tiktrue.ui.admin.errors import AdminError, as_admin_error
from tiktrue.ui.admin.jobs import Job
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.layout import page_frame, require_admin

SECTIONS = (
    ("Nodes", "lan", "/admin"),
    ("Plan", "view_week", "/admin/plan"),
    ("Events", "notifications", "/admin/events"),
    ("Reports", "insights", "/admin/reports"),
    ("Tasks", "terminal", "/admin/tasks"),
    ("Models", "inventory_2", "/admin/models"),
    ("People", "group", "/admin/people"),
)
STATE_COLORS = {
    "online": "positive",
    "serving": "positive",
    "suspect": "warning",
    "dead": "negative",
    "offline": "negative",
}
WIDE = {"classes": "gt-xs", "headerClasses": "gt-xs"}  # a table column hidden at phone width
LEVEL_COLORS = {"warning": "warning", "error": "negative", "critical": "negative"}

STYLE = """
.tt-bar { position: relative; height: 14px; border-radius: 7px; background: #eef0f4;
          overflow: hidden; }
.tt-bar > .tt-span { position: absolute; top: 0; bottom: 0; border-radius: 7px;
                     background: #4f46e5; }
.tt-bar > .tt-span.tt-backup { background: repeating-linear-gradient(45deg, #f59e0b,
                               #f59e0b 6px, #fbbf24 6px, #fbbf24 12px); }
.tt-section { font-size: 1.05rem; font-weight: 600; margin-top: 0.5rem; }
.tt-grid { display: grid; gap: 0.75rem; width: 100%;
           grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); }
.tt-kv { display: grid; grid-template-columns: auto 1fr; column-gap: 0.75rem; row-gap: 0.15rem;
         font-size: 0.875rem; }
.tt-kv > :nth-child(odd) { color: #6b7280; }
.tt-kv > * { min-width: 0; overflow-wrap: anywhere; }
"""


def fmt_bytes(count: float | None) -> str:
    return "?" if count is None else human_bytes(count)


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def fmt_ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s ago"


def section(title: str) -> None:
    ui.label(title).classes("tt-section")


@contextmanager
def admin_frame(current: str, network_id: str | None = None) -> Iterator[bool]:
    """An admin page: the login check, the frame and the section nav; yields whether to
    build the page (False: the person was sent away)."""
    if require_admin() is None:
        yield False
        return
    with page_frame("Admin"):
        admin_nav(current, network_id)
        yield True


@contextmanager
def network_frame(ops: AdminOperations, current: str, wanted: str | None) -> Iterator[dict | None]:
    """An admin page about one network: ``admin_frame`` and ``pick_network``; yields the
    network (None: nothing to build)."""
    with admin_frame(current, wanted) as allowed:
        path = next(t for text, _, t in SECTIONS if text.lower() == current)
        yield pick_network(ops, wanted, path) if allowed else None


def admin_nav(current: str, network_id: str | None = None) -> None:
    """The dashboard's sections as a row of links (it wraps on a phone)."""
    ui.add_css(STYLE)
    query = f"?network={network_id}" if network_id else ""
    with ui.row().classes("gap-1 w-full flex-wrap"):
        for text, icon, target in SECTIONS:
            active = text.lower() == current
            button = ui.button(text, icon=icon, on_click=lambda t=target: ui.navigate.to(t + query))
            button.props(
                f'no-caps dense aria-label="{text}" ' + ("unelevated" if active else "flat")
            )
            button.classes("px-3" + ("" if active else " text-grey-8"))


def pick_network(ops: AdminOperations, wanted: str | None, page: str) -> dict | None:
    """The network the page shows (``?network=``, else the first); a selector when this node
    administers several, a pointer to the set-up when none. None: nothing to show."""
    networks = ops.networks()
    if not networks:
        with ui.column().classes("tt-card w-full p-4 gap-2"):
            ui.label("This PC administers no network yet.")
            ui.link("Create one", "/setup")
        return None
    chosen = next((n for n in networks if n["network_id"] == wanted), networks[0])
    if len(networks) > 1:
        ui.select(
            {n["network_id"]: f"{n['name']} ({n['network_id']})" for n in networks},
            label="Network",
            value=chosen["network_id"],
            on_change=lambda e: ui.navigate.to(f"{page}?network={e.value}"),
        ).props("outlined dense").classes("w-full sm:w-80")
    return chosen


def block_map(view: dict, box: ui.element) -> None:
    """Draw a block map (``operations.block_map`` / ``plan_view``) into ``box``: one bar per
    node, its span placed along the whole chain; backups striped."""
    box.clear()
    chain = view.get("chain") or []
    total = max(1, len(chain))
    with box:
        if not view.get("nodes"):
            ui.label("No node holds blocks.").classes("tt-muted")
        for row in view.get("nodes", []):
            label = row["name"] or row["node_id"]
            kind = "backup of" if row["kind"] == "backup" else "holds"
            held = f"{row['span']} ({row['count']} blocks)" if row["count"] else "no blocks"
            with ui.column().classes("w-full gap-1").props(f'data-node="{row["node_id"]}"'):
                with ui.row().classes("w-full justify-between gap-2 text-sm no-wrap"):
                    ui.label(label).classes("font-medium truncate")
                    ui.label(f"{kind} {held}").classes("tt-muted text-right")
                bar = ui.element("div").classes("tt-bar w-full")
                bar.props(f'aria-label="{label} {kind} {held}" role="img"')
                if row["count"]:
                    left = 100 * row["first"] / total
                    width = max(1.5, 100 * row["count"] / total)
                    extra = " tt-backup" if row["kind"] == "backup" else ""
                    with bar:
                        ui.element("div").classes("tt-span" + extra).style(
                            f"left:{left:.2f}%;width:{width:.2f}%"
                        )
        if chain:
            with ui.row().classes("w-full justify-between text-xs tt-muted"):
                ui.label(chain[0])
                ui.label(f"{len(chain)} blocks in chain order")
                ui.label(chain[-1])


def data_table(columns: list[dict], row_key: str, empty: str, **options) -> ui.table:
    """A table of the dashboard (dense, wrapping cells, ``empty`` when it has no rows)."""
    table = ui.table(columns=columns, rows=[], row_key=row_key, **options)
    table.props(f'flat bordered dense wrap-cells no-data-label="{empty}"').classes("w-full")
    return table


def row_button(
    table: ui.table,
    event: str,
    *,
    label: str,
    icon: str,
    aria: str,
    arg: str = "props.row.id",
    show: str = "true",
    negative: bool = False,
) -> None:
    """A button in the ``actions`` column of each row (shown where the JS condition ``show``
    holds) that emits ``event`` with ``arg``; ``aria`` is a JS expression naming it."""
    color = 'color="negative"' if negative else ""
    table.add_slot(
        "body-cell-actions",
        f"""<q-td :props="props">
  <q-btn v-if="{show}" flat dense no-caps {color} icon="{icon}" label="{label}"
         :aria-label="{aria}" @click="() => $parent.$emit('{event}', {arg})" />
</q-td>""",
    )


class JobView:
    """A job's progress bar, step and per-part bars, updated in place by ``update``."""

    def __init__(self, job: Job) -> None:
        self.job_id = job.id
        with ui.column().classes("w-full gap-1") as self.box:
            with ui.row().classes("w-full justify-between gap-2 text-sm"):
                ui.label(job.title).classes("font-medium")
                self.state = ui.label()
            self.bar = ui.linear_progress(0, show_value=False).props(
                f'aria-label="Progress of {job.title}" instant-feedback'
            )
            self.step = ui.label().classes("tt-muted text-sm")
            self.parts = ui.column().classes("w-full gap-1")
        self._parts: dict[str, tuple[ui.label, ui.linear_progress]] = {}
        self.update(job)

    def update(self, job: Job) -> None:
        fraction = job.fraction
        self.bar.set_value(fraction or 0)
        self.bar.props(remove="indeterminate" if fraction is not None else None)
        if fraction is None and job.state == "running":
            self.bar.props("indeterminate")
        color = {"done": "positive", "failed": "negative"}.get(job.state, "primary")
        self.bar.props(f"color={color}")
        percent = "" if fraction is None else f" {100 * fraction:.0f}%"
        self.state.set_text(f"{job.state}{percent}")
        step = job.step
        if job.error:
            step = job.error["message"]
        elif job.total and job.kind != "verify":
            step = f"{step} ({fmt_bytes(job.done)} of {fmt_bytes(job.total)})"
        self.step.set_text(step)
        self.step.classes(replace="text-sm " + ("text-negative" if job.error else "tt-muted"))
        for name, part in job.parts.items():
            if name not in self._parts:
                with self.parts, ui.row().classes("w-full items-center gap-2 no-wrap text-xs"):
                    label = ui.label().classes("w-40 truncate")
                    bar = ui.linear_progress(0, show_value=False).props(
                        f'aria-label="Sent to {name}" instant-feedback'
                    )
                    self._parts[name] = (label, bar)
            label, bar = self._parts[name]
            label.set_text(f"{name}: {fmt_bytes(part['done'])}/{fmt_bytes(part['total'])}")
            bar.set_value(part["done"] / part["total"] if part["total"] else 1.0)


def follow_job(job: Job, box: ui.element, on_end: Callable[[Job], Any] | None = None) -> JobView:
    """Show ``job`` in ``box`` and keep it current until it ends."""
    with box:
        view = JobView(job)
        timer = ui.timer(0.5, lambda: None)

    def tick() -> None:
        view.update(job)
        if job.state != "running":
            timer.deactivate()
            if on_end is not None:
                on_end(job)

    timer.callback = tick
    return view


async def attempt(action: Awaitable | Callable[[], Any], done: str | None = None) -> Any:
    """Run an operation; a refusal is shown to the person (and None returned)."""
    try:
        result = action() if callable(action) else action
        if hasattr(result, "__await__"):
            result = await result
    except AdminError as exc:
        ui.notify(exc.message, type="negative", multi_line=True, close_button="OK")
        return None
    except Exception as exc:  # a bug: say so rather than leave the page silent
        error = as_admin_error(exc)
        ui.notify(error.message, type="negative", multi_line=True, close_button="OK")
        return None
    if done:
        ui.notify(done, type="positive")
    return result
