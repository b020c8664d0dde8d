"""``/admin/plan``: what each PC gives (caps: RAM, CPU threads, disk as sliders), the plan the
planner makes with them (block map, estimated time per token) and its verdict ("fits" or what
is missing), before anything changes; then "Apply" with the progress of the distribution.

The nodes are measured once when the page opens ("Measure again" repeats it); each slider move
re-plans on that measurement, a fraction of a second after the slider stops.

"Rebalance from the measured load" reads the metrics history of the current plan: which PC
slows the chain (per hop: compute, queue, link), the plan the planner makes with the measured
speeds and its expected gain; "Rebalance now" is the admin's OK (nothing changes before).
"""

from __future__ import annotations

import asyncio

from nicegui import ui

from tiktrue.node.resources import DEFAULT_DISK_FRACTION, NodeCaps, ram_cap
from tiktrue.ui.admin.operations import AdminOperations, PlanRequest
from tiktrue.ui.admin.widgets import (
    attempt,
    block_map,
    data_table,
    fmt_bytes,
    fmt_ms,
    follow_job,
    network_frame,
    section,
    state_text,
)
from tiktrue.ui.i18n import N_, _, translate
from tiktrue.ui.refusals import plan_refusal

GB = 1e9
HOP_COLUMNS = [
    {"name": "name", "label": N_("PC"), "field": "name_text", "align": "left"},
    {"name": "span", "label": N_("Blocks"), "field": "span", "align": "left"},
    {"name": "compute", "label": N_("Compute"), "field": "compute_text"},
    {"name": "wait", "label": N_("Waits"), "field": "wait_text"},
    {"name": "link", "label": N_("Link"), "field": "link_text"},
    {"name": "cpu", "label": N_("CPU"), "field": "cpu_text"},
    {"name": "share", "label": N_("Share of a token"), "field": "share_text"},
]
RAM_STEP_GB = 0.1
DEBOUNCE_S = 0.25


class CapsCard:
    """The three caps of one node as sliders, with what the node has."""

    def __init__(self, node: dict, on_change) -> None:
        res = node.get("resources") or {}
        caps = node.get("caps") or {}
        self.node_id = node["node_id"]
        self.name = node.get("name") or self.node_id
        self.touched: dict[str, float] = {}
        self.on_change = on_change
        ram_total = res.get("ram_total_bytes") or 0
        disk_free = res.get("disk_free_bytes") or 0
        cores = res.get("cpu_cores_logical") or 1
        with ui.column().classes("tt-card p-4 gap-1 w-full").props(f'data-node="{self.node_id}"'):
            with ui.row().classes("w-full justify-between items-baseline gap-2 no-wrap"):
                ui.label(self.name).classes("font-semibold truncate")
                ui.label(state_text(node.get("role"))).classes("tt-muted text-xs")
            where = " · ".join(p for p in (res.get("hostname"), node.get("address")) if p)
            ui.label(where).classes("tt-muted text-xs truncate")
            if not res:
                ui.label(_("not measured: {state}", state=state_text(node.get("state")))).classes(
                    "text-negative text-sm"
                )
                return
            self.ram = self._slider(
                _("RAM"),
                "ram",
                RAM_STEP_GB,
                max(RAM_STEP_GB, round(ram_total / GB, 1)),
                ram_cap(caps.get("ram_bytes"), ram_total) / GB,  # what the planner assumes
                lambda v: _("{gb:.1f} GB of {total}", gb=v, total=fmt_bytes(ram_total)),
            )
            self.threads = self._slider(
                _("CPU threads"),
                "threads",
                1,
                cores,
                caps.get("threads") or cores,
                lambda v: _("{n:.0f} of {cores}", n=v, cores=cores),
            )
            self.disk = self._slider(
                _("Disk"),
                "disk",
                RAM_STEP_GB,
                max(RAM_STEP_GB, round(disk_free / GB, 1)),
                (caps.get("disk_bytes") or disk_free * DEFAULT_DISK_FRACTION) / GB,
                lambda v: _("{gb:.1f} GB of {free} free", gb=v, free=fmt_bytes(disk_free)),
            )

    def _slider(self, title, key, low, high, value, text):
        with ui.row().classes("w-full justify-between gap-2 text-sm no-wrap"):
            ui.label(title)
            shown = ui.label(text(value)).classes("tt-muted text-end")
        step = 1 if key == "threads" else RAM_STEP_GB
        value = min(high, max(low, round(value / step) * step))

        def changed(event) -> None:
            shown.set_text(text(event.value))
            self.touched[key] = event.value
            self.on_change()

        slider = ui.slider(min=low, max=high, step=step, value=value, on_change=changed)
        named = _("{what} for {node}", what=title, node=self.name)
        slider.props(f'aria-label="{named}"')
        return slider

    def caps(self) -> NodeCaps | None:
        """The caps the person moved (None: leave this node as it is)."""
        if not self.touched:
            return None
        return NodeCaps(
            ram_bytes=int(self.ram.value * GB),
            threads=int(self.threads.value),
            disk_bytes=int(self.disk.value * GB),
        )


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/plan")
    def plan_page(network: str | None = None) -> None:
        with network_frame(ops, "plan", network) as chosen:
            if chosen is None:
                return
            network_id = chosen["network_id"]
            with ui.column().classes("tt-card w-full p-4 gap-2"):
                with ui.row().classes("w-full items-center gap-2 no-wrap"):
                    verdict_icon = ui.icon("hourglass_empty").classes("text-2xl")
                    verdict = ui.label(_("Measuring the nodes…")).classes("grow font-medium")
                    verdict.props('data-testid="verdict" aria-live="polite"')
                detail = ui.label().classes("tt-muted text-sm")
                with ui.row().classes("w-full gap-2 justify-end"):
                    label = _("Measure again")
                    measure_button = ui.button(label, icon="speed").props(
                        f'flat no-caps aria-label="{label}"'
                    )
                    label = _("Apply")
                    apply_button = ui.button(label, icon="play_arrow").props(
                        f'unelevated no-caps aria-label="{label}"'
                    )
                jobs = ui.column().classes("w-full gap-2")
            section(_("Block map of this plan"))
            map_box = ui.column().classes("tt-card w-full p-4 gap-3")
            section(_("What each PC gives"))
            grid = ui.element("div").classes("tt-grid")
            cards: dict[str, CapsCard] = {}
            pending: dict[str, asyncio.Task] = {}

            def request() -> PlanRequest:
                caps = {i: c.caps() for i, c in cards.items()}
                return PlanRequest(caps={i: c for i, c in caps.items() if c is not None})

            async def preview() -> None:
                shown = await attempt(ops.preview(network_id, request()))
                if shown is None:
                    return
                fits = shown["fits"]
                verdict.set_text(
                    plan_refusal(shown["verdict"]) if not fits else translate(shown["verdict"])
                )
                verdict.classes(replace="grow font-medium " + ("" if fits else "text-negative"))
                verdict_icon.props(f"name={'check_circle' if fits else 'error'}")
                verdict_icon.props(f"color={'positive' if fits else 'negative'}")
                apply_button.set_enabled(fits)
                if fits:
                    plan = shown["plan"]
                    notes = "; ".join(plan["notes"])
                    detail.set_text(
                        _(
                            "KV cache for {tokens} tokens reserved on each node",
                            tokens=plan["context_tokens"],
                        )
                        + (_(". No backup: {notes}", notes=notes) if notes else "")
                    )
                    block_map(plan, map_box)
                else:
                    detail.set_text(_("Give the nodes more, or add a PC, then look again."))
                    map_box.clear()
                    with map_box:
                        ui.label(_("No plan fits these caps.")).classes("text-negative")

            def later() -> None:
                task = pending.get("preview")
                if task is not None and not task.done():
                    task.cancel()

                async def after_pause() -> None:
                    await asyncio.sleep(DEBOUNCE_S)
                    await preview()

                pending["preview"] = asyncio.create_task(after_pause())

            async def measure(fresh: bool = False) -> None:
                verdict.set_text(_("Measuring the nodes…"))
                measure_button.disable()
                status = await attempt(ops.measure(network_id, fresh=fresh))
                measure_button.enable()
                if status is None:
                    verdict.set_text(_("The nodes could not be measured."))
                    return
                grid.clear()
                cards.clear()
                with grid:
                    for node in status["nodes"]:
                        cards[node["node_id"]] = CapsCard(node, later)
                await preview()

            def applied(job) -> None:
                if job.state == "done":
                    ui.notify(translate(job.result["summary"]), type="positive")
                apply_button.enable()
                ui.timer(0.1, measure, once=True)

            async def apply() -> None:
                job = await attempt(lambda: ops.apply(network_id, request()))
                if job is not None:
                    apply_button.disable()
                    jobs.clear()
                    follow_job(job, jobs, applied)

            measure_button.on_click(lambda: measure(True))
            apply_button.on_click(apply)
            ui.timer(0.05, measure, once=True)
            rebalance_card(ops, network_id)


def rebalance_card(ops: AdminOperations, network_id: str) -> None:
    """Which PC slows the chain, from the metrics history; a faster plan; the admin's OK."""
    section(_("Rebalance from the measured load"))
    with ui.column().classes("tt-card w-full p-4 gap-2"):
        ui.label(
            _(
                "Reads the last day's answers on the current plan: what a token costs on each "
                "PC (its compute, its queue, its link), and the plan the measured speeds call for."
            )
        ).classes("tt-muted text-sm")
        summary = ui.label().classes("text-sm")
        hops = data_table(HOP_COLUMNS, "node_id", _("Not analysed yet"))
        verdict = ui.label().classes("font-medium")
        verdict.props('data-testid="rebalance-verdict" aria-live="polite"')
        planned = ui.column().classes("w-full gap-3")
        with ui.row().classes("w-full gap-2 justify-end"):
            label = _("Analyse the load")
            analyse = ui.button(_("Analyse"), icon="insights").props(
                f'flat no-caps aria-label="{label}"'
            )
            label = _("Rebalance now")
            approve = ui.button(label, icon="play_arrow").props(
                f'unelevated no-caps aria-label="{label}"'
            )
            approve.disable()
        jobs = ui.column().classes("w-full gap-2")

    async def run_analysis() -> None:
        analyse.disable()
        verdict.set_text(_("Reading the history and measuring the nodes…"))
        found = await attempt(ops.rebalance(network_id))
        analyse.enable()
        if found is None:
            verdict.set_text("")
            return
        verdict.set_text(found["verdict"])
        approve.set_enabled(found["worth_it"])
        planned.clear()
        if not found["measured"]:
            summary.set_text("")
            hops.update_rows([])
            return
        summary.set_text(found["summary"])
        hops.update_rows(
            [
                {
                    **h,
                    "name_text": _("{name} (slowest)", name=h["name"])
                    if h["slowest"]
                    else h["name"],
                    "compute_text": fmt_ms(h["compute_ms"]),
                    "wait_text": fmt_ms(h["wait_ms"]),
                    "link_text": fmt_ms(h["link_ms"]),
                    "cpu_text": "-"
                    if h["cpu_percent"] is None
                    else _("{percent:.0f}%", percent=h["cpu_percent"]),
                    "share_text": _("{percent:.0f}%", percent=h["share"] * 100),
                }
                for h in found["hops"]
            ]
        )
        if found["worth_it"]:
            block_map(found["plan"], planned)

    def applied(job) -> None:
        if job.state == "done":
            ui.notify(translate(job.result["summary"]), type="positive")
        ui.timer(0.1, run_analysis, once=True)

    async def apply_it() -> None:
        job = await attempt(lambda: ops.apply_rebalance(network_id))
        if job is not None:
            approve.disable()
            jobs.clear()
            follow_job(job, jobs, applied)

    analyse.on_click(run_analysis)
    approve.on_click(apply_it)
