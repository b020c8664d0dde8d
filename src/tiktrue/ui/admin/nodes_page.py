"""``/admin``: the network's PCs — asking to join (approve, refuse; first, as they wait for
the admin), joined (resources, caps, span, health, live), seen on the LAN (invite with a
token) — and the block map.

The full status (one control-channel call per node) is read when the page opens and every
``FULL_EVERY_S``; health, load, RAM and heartbeat RTT come from the admin's monitor every
``LIVE_EVERY_S`` and only change the figures in place.
"""

from __future__ import annotations

import time

from nicegui import ui

from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import (
    STATE_COLORS,
    attempt,
    block_map,
    fmt_ago,
    fmt_bytes,
    fmt_ms,
    network_frame,
    section,
    state_text,
)
from tiktrue.ui.i18n import _, isolate, ngettext
from tiktrue.ui.i18n import fmt_ago as ago_in_words
from tiktrue.ui.trust_page import reach_card

LIVE_EVERY_S = 2.0
FULL_EVERY_S = 15.0


def _used(free: int | None, total: int | None) -> float:
    return 0.0 if not total or free is None else max(0.0, min(1.0, 1 - free / total))


class NodeCard:
    """One PC of the network: what it has, what it gives, what it holds, how it is."""

    def __init__(self, node: dict) -> None:
        self.node_id = node["node_id"]
        with (
            ui.column()
            .classes("tt-card p-4 gap-2 w-full")
            .props(f'data-node="{self.node_id}"') as self.box
        ):
            with ui.row().classes("w-full items-start justify-between gap-2 no-wrap"):
                with ui.column().classes("gap-0 min-w-0"):
                    self.name = ui.label().classes("font-semibold truncate")
                    self.address = ui.label().classes("tt-muted text-xs truncate")
                with ui.row().classes("gap-1 no-wrap"):
                    self.role = ui.badge(outline=True)
                    self.state = ui.badge()
            with ui.element("div").classes("tt-kv w-full"):
                ui.label(_("CPU"))
                self.cpu = ui.label()
                ui.label(_("RAM"))
                with ui.column().classes("gap-0"):
                    self.ram = ui.label()
                    self.ram_bar = ui.linear_progress(0, show_value=False, size="6px")
                ui.label(_("Disk"))
                with ui.column().classes("gap-0"):
                    self.disk = ui.label()
                    self.disk_bar = ui.linear_progress(0, show_value=False, size="6px")
                ui.label(_("GPU"))
                self.gpu = ui.label()
                ui.label(_("Caps"))
                self.caps = ui.label()
                ui.label(_("Blocks"))
                self.span = ui.label()
                ui.label(_("Heartbeat"))
                self.beat = ui.label()
        ram_used, disk_used = _("RAM in use"), _("Disk in use")
        self.ram_bar.props(f'aria-label="{ram_used}"')
        self.disk_bar.props(f'aria-label="{disk_used}"')
        self.resources: dict = {}
        self.seen: dict = {}
        self.update(node)

    def update(self, node: dict) -> None:
        """From the full status (``ops.status``)."""
        res = node.get("resources") or {}
        self.resources = res
        self.name.set_text(node.get("name") or self.node_id)
        host = res.get("hostname")
        self.address.set_text(" · ".join(p for p in (host, node.get("address")) if p) or "?")
        self.role.set_text(state_text(node.get("role")))
        cores = res.get("cpu_cores_logical")
        model = res.get("cpu_model") or _("unknown CPU")
        self.cpu_base = (
            ngettext("{model}, {n} core", "{model}, {n} cores", cores, model=model)
            if cores
            else model
        )
        gpus = res.get("gpus") or []
        self.gpu.set_text(
            ", ".join(f"{g['name']} ({fmt_bytes(g['memory_total_bytes'])})" for g in gpus)
            or _("none")
        )
        caps = node.get("caps") or {}
        parts = [
            _("RAM {size}", size=fmt_bytes(caps["ram_bytes"])) if caps.get("ram_bytes") else "",
            ngettext("{n} thread", "{n} threads", caps["threads"]) if caps.get("threads") else "",
            _("disk {size}", size=fmt_bytes(caps["disk_bytes"])) if caps.get("disk_bytes") else "",
        ]
        self.caps.set_text(" · ".join(p for p in parts if p) or _("none set (defaults)"))
        blocks = node.get("blocks") or []
        span = f"{blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else "".join(blocks)
        self.span.set_text(_("{span} ({n})", span=span, n=len(blocks)) if blocks else _("none"))
        state = node.get("state")
        self.live(
            {
                "state": node.get("health") or state,
                "serving": state == "serving",
                # "" (not None): a node that stopped waiting must clear what live() keeps
                "waiting": "" if state in ("serving", "idle") else state,
                "cpu_percent": res.get("cpu_load_percent"),
                "ram_free_bytes": res.get("ram_free_bytes"),
                "ram_total_bytes": res.get("ram_total_bytes"),
                "disk_free_bytes": res.get("disk_free_bytes"),
                "disk_total_bytes": res.get("disk_total_bytes"),
                "last_beat_s": node.get("last_beat_s"),
                "rtt_ms": node.get("rtt_ms"),
            }
        )

    def live(self, seen: dict) -> None:
        """From the admin's health monitor (``ops.live``): figures only; one it has not got
        yet (a node not beaten yet) keeps the last known."""
        self.seen = seen = {**self.seen, **{k: v for k, v in seen.items() if v is not None}}
        state = seen.get("state") or "unknown"
        if state == "online" and seen.get("serving") is False:
            state = "online, idle" if not seen.get("waiting") else "waiting"
        self.state.set_text(state_text(state))
        self.state.props(f"color={STATE_COLORS.get(state.split(',')[0], 'grey')}")
        load = seen.get("cpu_percent")
        self.cpu.set_text(
            self.cpu_base + (_(" · load {load:.0f}%", load=load) if load is not None else "")
        )
        free, total = seen.get("ram_free_bytes"), seen.get("ram_total_bytes")
        self.ram.set_text(_("{free} free of {total}", free=fmt_bytes(free), total=fmt_bytes(total)))
        self.ram_bar.set_value(_used(free, total))
        free, total = seen.get("disk_free_bytes"), seen.get("disk_total_bytes")
        self.disk.set_text(
            _("{free} free of {total}", free=fmt_bytes(free), total=fmt_bytes(total))
        )
        self.disk_bar.set_value(_used(free, total))
        self.beat.set_text(
            _(
                "{ago} · RTT {rtt}",
                ago=fmt_ago(seen.get("last_beat_s")),
                rtt=fmt_ms(seen.get("rtt_ms")),
            )
        )


def _version(network: dict) -> str:
    return _("{model} · config v{version}", model=network["model_id"], version=network["version"])


def invite_dialog(ops: AdminOperations, network_id: str) -> ui.dialog:
    """Make a one-time join token and show the command for the other PC."""
    with ui.dialog() as dialog, ui.card().classes("w-full max-w-lg gap-3"):
        ui.label(_("Invite a PC")).classes("text-lg font-semibold")
        ui.label(
            _(
                "A one-time token lets one more PC join at once. On that PC, run the command "
                "below (or paste the token into its Join page)."
            )
        ).classes("tt-muted text-sm")
        hours = ui.number(_("Valid for (hours)"), value=24, min=1, max=8760, step=1)
        hours.props("outlined dense")
        shown = ui.textarea(_("Command for the other PC")).props("outlined readonly autogrow")
        shown.classes("w-full font-mono text-xs tt-ltr").set_visibility(False)

        async def make() -> None:
            made = await attempt(ops.create_token(network_id, float(hours.value or 24)))
            if made:
                shown.set_value(made["command"])
                shown.set_visibility(True)

        with ui.row().classes("w-full justify-end gap-2"):
            close, make_it = _("Close"), _("Make token")
            ui.button(close, on_click=dialog.close).props(f'flat no-caps aria-label="{close}"')
            ui.button(make_it, on_click=make).props(f'unelevated no-caps aria-label="{make_it}"')
    return dialog


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin")
    def nodes_page(network: str | None = None) -> None:
        with network_frame(ops, "nodes", network) as chosen:
            if chosen is None:
                return
            network_id = chosen["network_id"]
            with ui.row().classes("w-full items-center gap-2"):
                ui.label(f"{chosen['name']}").classes("text-lg font-medium")
                version = ui.label(_version(chosen))
                version.classes("tt-muted")
                health = ui.badge()
                ui.space()
                invite = invite_dialog(ops, network_id)
                label = _("Invite a PC")
                ui.button(label, icon="person_add", on_click=invite.open).props(
                    f'outline no-caps aria-label="{label}"'
                )
            reach_card()
            with ui.column().classes("w-full gap-2") as requests_title:
                section(_("Asking to join"))
                requests = ui.column().classes("w-full gap-2")
            section(_("Nodes"))
            grid = ui.element("div").classes("tt-grid")
            with grid:
                ui.label(_("Asking every node how it is…")).classes("tt-muted")
            with ui.column().classes("w-full gap-2") as seen_title:
                section(_("Seen on the LAN"))
                seen = ui.column().classes("w-full gap-2")
            requests_title.set_visibility(False)
            seen_title.set_visibility(False)
            section(_("Block map"))
            map_box = ui.column().classes("tt-card w-full p-4 gap-3")
            cards: dict[str, NodeCard] = {}

            async def decide(request_id: str, approve: bool) -> None:
                said = _("Request approved") if approve else _("Request refused")
                if await attempt(ops.decide(network_id, request_id, approve), said):
                    await load()

            def show_requests(pending: list[dict]) -> None:
                requests.clear()
                requests_title.set_visibility(bool(pending))
                for item in pending:
                    who = item["name"] or item["node_id"]
                    with (
                        requests,
                        ui.row()
                        .classes("tt-card w-full p-3 items-center gap-2")
                        .props(f'data-request="{item["request_id"]}"'),
                    ):
                        with ui.column().classes("gap-0 grow min-w-0"):
                            ui.label(who).classes("font-medium truncate")
                            asked = time.time() - (item["asked_at"] or time.time())
                            ui.label(
                                _(
                                    "{host} · node {node} · asked {ago}",
                                    host=item["host"],
                                    node=item["node_id"],
                                    ago=ago_in_words(asked),
                                )
                            ).classes("tt-muted text-xs")
                        named = _("Approve {name}", name=who)
                        ui.button(
                            _("Approve"), on_click=lambda i=item: decide(i["request_id"], True)
                        ).props(f'unelevated no-caps aria-label="{named}"')
                        named = _("Refuse {name}", name=who)
                        ui.button(
                            _("Refuse"), on_click=lambda i=item: decide(i["request_id"], False)
                        ).props(f'flat no-caps color=negative aria-label="{named}"')

            def show_seen(found: list[dict]) -> None:
                seen.clear()
                seen_title.set_visibility(bool(found))
                for node in found:
                    with seen, ui.row().classes("tt-card w-full p-3 items-center gap-2"):
                        with ui.column().classes("gap-0 grow min-w-0"):
                            ui.label(node["name"] or node["node_id"]).classes("font-medium")
                            member = ", ".join(node["networks"].values()) or _("in no network")
                            where = f"{node['host']}:{node['control_port']}"
                            ui.label(f"{isolate(where)} · {isolate(member)}").classes(
                                "tt-muted text-xs"
                            )
                        named = _("Invite this PC")
                        ui.button(_("Invite"), on_click=invite.open).props(
                            f'flat no-caps aria-label="{named}"'
                        )

            async def load() -> None:
                status = await attempt(ops.status(network_id))
                if status is None:
                    return
                version.set_text(_version(status))
                ids = [n["node_id"] for n in status["nodes"]]
                if list(cards) != ids:
                    grid.clear()
                    cards.clear()
                    with grid:
                        for node in status["nodes"]:
                            cards[node["node_id"]] = NodeCard(node)
                else:
                    for node in status["nodes"]:
                        cards[node["node_id"]].update(node)
                show_requests(status["pending"])
                show_seen(status["discovered"])
                block_map(status["block_map"], map_box)

            async def tick() -> None:
                try:
                    live = await ops.live(network_id)
                except Exception:  # the next tick or the full load says what is wrong
                    return
                healthy = live["healthy"]
                health.set_text(
                    _("healthy")
                    if healthy
                    else _("healing")
                    if healthy is False
                    else _("no gateway")
                )
                health.props(
                    f"color={'positive' if healthy else 'negative' if healthy is False else 'grey'}"
                )
                for node_id, figures in live["nodes"].items():
                    card = cards.get(node_id)
                    if card is not None:
                        card.live(figures)

            ui.timer(0.05, load, once=True)
            ui.timer(FULL_EVERY_S, load)
            ui.timer(LIVE_EVERY_S, tick)
