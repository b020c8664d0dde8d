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

from tiktrue.ui import i18n
from tiktrue.ui.admin.errors import as_admin_error
from tiktrue.ui.admin.jobs import Job
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.i18n import N_, _, ngettext, translate
from tiktrue.ui.layout import page_frame, require_admin
from tiktrue.ui.refusals import refused

SECTIONS = (  # (name, icon, path); the name is shown translated and is the page's key
    (N_("Nodes"), "lan", "/admin"),
    (N_("Plan"), "view_week", "/admin/plan"),
    (N_("Events"), "notifications", "/admin/events"),
    (N_("Reports"), "insights", "/admin/reports"),
    (N_("Tasks"), "terminal", "/admin/tasks"),
    (N_("Models"), "inventory_2", "/admin/models"),
    (N_("People"), "group", "/admin/people"),
)
STATES = {  # what the health monitor, the jobs and the nodes say, for people
    "online": N_("online"),
    "online, idle": N_("online, idle"),
    "serving": N_("serving"),
    "idle": N_("idle"),
    "waiting": N_("waiting"),
    "suspect": N_("suspect"),
    "dead": N_("dead"),
    "offline": N_("offline"),
    "unknown": N_("unknown"),
    "running": N_("running"),
    "done": N_("done"),
    "failed": N_("failed"),
    "admin": N_("admin"),
    "worker": N_("worker"),
    "backup": N_("backup"),
    "user": N_("user"),
    "active": N_("active"),
    "revoked": N_("revoked"),
    "expired": N_("expired"),
    "warning": N_("warning"),
    "error": N_("error"),
    "critical": N_("critical"),
    "info": N_("info"),
}
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


fmt_bytes = i18n.fmt_bytes


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else _("{ms:.1f} ms", ms=value)


def fmt_ago(seconds: float | None) -> str:
    return _("never") if seconds is None else _("{seconds:.1f} s ago", seconds=seconds)


def state_text(state: str | None) -> str:
    """A state word (``online``, ``running``, ``admin`` ...) in the person's language."""
    return translate(STATES.get(state or "unknown", state or "?"))


def section(title: str) -> None:
    ui.label(title).classes("tt-section")


@contextmanager
def admin_frame(current: str, network_id: str | None = None) -> Iterator[bool]:
    """An admin page: the login check, the frame and the section nav; yields whether to
    build the page (False: the person was sent away)."""
    if require_admin() is None:
        yield False
        return
    with page_frame(_("Admin")):
        admin_nav(current, network_id)
        yield True


@contextmanager
def network_frame(ops: AdminOperations, current: str, wanted: str | None) -> Iterator[dict | None]:
    """An admin page about one network: ``admin_frame`` and ``pick_network``; yields the
    network (None: nothing to build)."""
    with admin_frame(current, wanted) as allowed:
        path = next(t for text, _icon, t in SECTIONS if text.lower() == current)
        yield pick_network(ops, wanted, path) if allowed else None


def admin_nav(current: str, network_id: str | None = None) -> None:
    """The dashboard's sections as a row of links (it wraps on a phone)."""
    ui.add_css(STYLE)
    query = f"?network={network_id}" if network_id else ""
    with ui.row().classes("gap-1 w-full flex-wrap"):
        for text, icon, target in SECTIONS:
            active = text.lower() == current
            label = translate(text)
            button = ui.button(
                label, icon=icon, on_click=lambda t=target: ui.navigate.to(t + query)
            )
            button.props(
                f'no-caps dense aria-label="{label}" ' + ("unelevated" if active else "flat")
            )
            button.classes("px-3" + ("" if active else " text-grey-8"))


def pick_network(ops: AdminOperations, wanted: str | None, page: str) -> dict | None:
    """The network the page shows (``?network=``, else the first); a selector when this node
    administers several, a pointer to the set-up when none. None: nothing to show."""
    networks = ops.networks()
    if not networks:
        with ui.column().classes("tt-card w-full p-4 gap-2"):
            ui.label(_("This PC administers no network yet."))
            ui.link(_("Create one"), "/setup")
        return None
    chosen = next((n for n in networks if n["network_id"] == wanted), networks[0])
    if len(networks) > 1:
        ui.select(
            {n["network_id"]: f"{n['name']} ({n['network_id']})" for n in networks},
            label=_("Network"),
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
            ui.label(_("No node holds blocks.")).classes("tt-muted")
        for row in view.get("nodes", []):
            label = row["name"] or row["node_id"]
            held = _held(row)
            with ui.column().classes("w-full gap-1").props(f'data-node="{row["node_id"]}"'):
                with ui.row().classes("w-full justify-between gap-2 text-sm no-wrap"):
                    ui.label(label).classes("font-medium truncate")
                    ui.label(held).classes("tt-muted text-end")
                bar = ui.element("div").classes("tt-bar w-full")
                bar.props(f'aria-label="{label}: {held}" role="img"')
                if row["count"]:
                    left = 100 * row["first"] / total
                    width = max(1.5, 100 * row["count"] / total)
                    extra = " tt-backup" if row["kind"] == "backup" else ""
                    with bar:
                        ui.element("div").classes("tt-span" + extra).style(
                            f"inset-inline-start:{left:.2f}%;width:{width:.2f}%"  # mirrored in RTL
                        )
        if chain:
            with ui.row().classes("w-full justify-between text-xs tt-muted"):
                ui.label(chain[0])
                ui.label(_("{n} blocks in chain order", n=len(chain)))
                ui.label(chain[-1])


def _held(row: dict) -> str:
    """What a node holds, in words: ``holds layer_0..layer_5 (6 blocks)``."""
    backup = row["kind"] == "backup"
    if not row["count"]:
        return _("backup of no blocks") if backup else _("holds no blocks")
    if backup:
        return ngettext(
            "backup of {span} ({n} block)",
            "backup of {span} ({n} blocks)",
            row["count"],
            span=row["span"],
        )
    return ngettext(
        "holds {span} ({n} block)", "holds {span} ({n} blocks)", row["count"], span=row["span"]
    )


def data_table(columns: list[dict], row_key: str, empty: str, **options) -> ui.table:
    """A table of the dashboard (dense, wrapping cells, ``empty`` when it has no rows); the
    columns' labels are translated here (``N_`` where they are defined), and their sides
    mirrored in a right-to-left language (Quasar's column ``align`` is physical)."""
    flip = {"left": "right", "right": "left"} if i18n.current().rtl else {}
    columns = [
        {**c, "label": translate(c["label"])}
        | ({"align": flip.get(c["align"], c["align"])} if "align" in c else {})
        for c in columns
    ]
    table = ui.table(columns=columns, rows=[], row_key=row_key, **options)
    table.props(f'flat bordered dense wrap-cells no-data-label="{empty}"').classes("w-full")
    language = i18n.current()
    if language.digits != i18n.SOURCE.digits:  # "1-25 of 80" in the language's digits
        label = _("{start}-{end} of {total}").replace("'", "")
        digits = f"n => n.toLocaleString('{language.quasar}')"
        table.props(
            f""":pagination-label="(s, e, t) => '{label}'.replace('{{start}}', ({digits})(s))"""
            f""".replace('{{end}}', ({digits})(e)).replace('{{total}}', ({digits})(t))" """
        )
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
    holds) that emits ``event`` with ``arg``; ``aria`` is a JS expression naming it
    (:func:`js_name`)."""
    color = 'color="negative"' if negative else ""
    table.add_slot(
        "body-cell-actions",
        f"""<q-td :props="props">
  <q-btn v-if="{show}" flat dense no-caps {color} icon="{icon}" label="{label}"
         :aria-label="{aria}" @click="() => $parent.$emit('{event}', {arg})" />
</q-td>""",
    )


def js_name(text: str, field: str) -> str:
    """A JS expression naming a row's button: ``text`` (translated) and the row's ``field``."""
    quoted = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{quoted} ' + props.row.{field}"


class JobView:
    """A job's progress bar, step and per-part bars, updated in place by ``update``."""

    def __init__(self, job: Job) -> None:
        self.job_id = job.id
        with ui.column().classes("w-full gap-1") as self.box:
            with ui.row().classes("w-full justify-between gap-2 text-sm"):
                title = translate(job.title)
                ui.label(title).classes("font-medium")
                self.state = ui.label()
            named = _("Progress of {title}", title=title)
            self.bar = ui.linear_progress(0, show_value=False).props(
                f'aria-label="{named}" instant-feedback'
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
        state = state_text(job.state)
        if fraction is not None:
            state = _("{state} {percent:.0f}%", state=state, percent=100 * fraction)
        self.state.set_text(state)
        step = translate(job.step)
        if job.error:
            step = refused(job.error["message"])
        elif job.total and job.kind != "verify":
            step = _(
                "{step} ({done} of {total})",
                step=step,
                done=fmt_bytes(job.done),
                total=fmt_bytes(job.total),
            )
        self.step.set_text(step)
        self.step.classes(replace="text-sm " + ("text-negative" if job.error else "tt-muted"))
        for name, part in job.parts.items():
            if name not in self._parts:
                with self.parts, ui.row().classes("w-full items-center gap-2 no-wrap text-xs"):
                    label = ui.label().classes("w-40 truncate")
                    sent = _("Sent to {node}", node=name)
                    bar = ui.linear_progress(0, show_value=False).props(
                        f'aria-label="{sent}" instant-feedback'
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
    except Exception as exc:  # a refusal, or a bug: say so rather than leave the page silent
        error = as_admin_error(exc)
        ui.notify(refused(error.message), type="negative", multi_line=True, close_button=_("OK"))
        return None
    if done:
        ui.notify(done, type="positive")
    return result
