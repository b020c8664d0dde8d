"""First run of a PC (admins only): ``/setup`` offers "Create new network" and "Join network";
``/setup/create`` and ``/setup/join`` run those flows with their progress (the model's
download, this PC's blocks) until the network works. The work itself is
``tiktrue.ui.network_setup``'s.
"""

from __future__ import annotations

import asyncio

from nicegui import background_tasks, ui

from tiktrue.control.network_manager import create_join_token, list_joined_networks
from tiktrue.ui.context import ui_context
from tiktrue.ui.layout import page_frame, require_admin
from tiktrue.ui.network_setup import (
    Progress,
    SetupError,
    admin_address,
    create_new_network,
    find_networks,
    join_existing_network,
    local_models,
)

POLL_S = 0.3  # how often a progress panel reads its job's figures


def register() -> None:
    @ui.page("/setup")
    def setup() -> None:
        if require_admin() is None:
            return
        with page_frame("Set up this PC"):
            ui.label(
                "TikTrue splits one language model across the PCs of your LAN. Create a new "
                "network on this PC (it becomes the network's admin), or join a network that "
                "another PC administers."
            ).classes("tt-muted max-w-3xl")
            with ui.row().classes("w-full gap-4 items-stretch"):
                _choice(
                    "Create new network",
                    "add_circle",
                    "This PC holds the model and invites the other PCs. Choose a model from "
                    "this PC or download one from a model repository.",
                    "/setup/create",
                )
                _choice(
                    "Join network",
                    "group_add",
                    "Give this PC's CPU, memory and disk to a network found on your LAN, "
                    "with a join token or the admin's approval.",
                    "/setup/join",
                )
            joined = list_joined_networks(ui_context().data_dir)
            if joined:
                ui.label("Networks of this PC").classes("text-lg font-medium mt-4")
                for config in joined:
                    ui.label(f"{config.name} · {config.model_id} · {len(config.nodes)} PCs")

    @ui.page("/setup/create")
    def create() -> None:
        if require_admin() is None:
            return
        with page_frame("Create new network"):
            _create_form()

    @ui.page("/setup/join")
    async def join() -> None:
        if require_admin() is None:
            return
        with page_frame("Join network"):
            await _join_form()


def _choice(title: str, icon: str, text: str, target: str) -> None:
    card = ui.card().classes("tt-card flex-1 min-w-[260px] p-6 cursor-pointer shadow-none")
    card.on("click", lambda: ui.navigate.to(target))
    with card:
        ui.icon(icon, color="primary").classes("text-4xl")
        ui.label(title).classes("text-lg font-semibold")
        ui.label(text).classes("tt-muted")
        ui.button(title, on_click=lambda: ui.navigate.to(target)).props(
            f'unelevated no-caps aria-label="{title}"'
        )


def _progress_panel(progress: Progress, on_done) -> ui.timer:
    """A panel showing ``progress`` (a sentence, the download and block bars); calls
    ``on_done()`` once when the job is done."""
    with ui.column().classes("tt-card w-full p-5 gap-3"):
        with ui.row().classes("items-center gap-3"):
            spinner = ui.spinner(size="md")
            step = ui.label().classes("font-medium")
        with ui.column().classes("w-full gap-1") as download_box:
            ui.label("Model download").classes("text-sm tt-muted")
            download = ui.linear_progress(show_value=False).props('aria-label="Model download"')
            download_text = ui.label().classes("text-sm tt-muted")
        with ui.column().classes("w-full gap-1") as blocks_box:
            ui.label("Blocks on this PC").classes("text-sm tt-muted")
            blocks = ui.linear_progress(show_value=False).props('aria-label="Blocks on this PC"')
            blocks_text = ui.label().classes("text-sm tt-muted")
        error = ui.label().classes("text-negative")
    finished = []

    def refresh() -> None:
        step.set_text(progress.step)
        download_box.set_visibility(progress.download is not None)
        download.set_value(progress.download or 0.0)
        download_text.set_text(progress.download_text)
        blocks_box.set_visibility(progress.blocks is not None)
        blocks.set_value(progress.blocks or 0.0)
        blocks_text.set_text(progress.blocks_text)
        error.set_text(progress.error or "")
        if (progress.done or progress.error) and not finished:
            finished.append(True)
            spinner.set_visibility(False)
            timer.deactivate()
            if progress.done:
                on_done()

    timer = ui.timer(POLL_S, refresh)
    return timer


def _create_form() -> None:
    context = ui_context()
    models = local_models(context.data_dir)
    with ui.column().classes("tt-card w-full max-w-2xl p-6 gap-4"):
        name = ui.input("Network name", value="Office").props("outlined").classes("w-full")
        source = ui.toggle(
            {"local": "A model on this PC", "repository": "A model repository"},
            value="local" if models else "repository",
        ).props('no-caps aria-label="Where the model comes from"')
        with ui.column().classes("w-full gap-3") as local_box:
            model = (
                ui.select(models, label="Model", value=next(iter(models), None))
                .props("outlined")
                .classes("w-full")
            )
            if not models:
                ui.label(
                    "No model on this PC yet: import one (tiktrue models import) or use a model "
                    "repository."
                ).classes("tt-muted text-sm")
        with ui.column().classes("w-full gap-3") as repo_box:
            url = ui.input("Repository address", placeholder="http://192.168.1.20:8765")
            url.props("outlined").classes("w-full")
            repo_model = ui.input("Model id in the repository", placeholder="smollm2-135m")
            repo_model.props("outlined").classes("w-full")
        with ui.row().classes("w-full gap-4"):
            port = ui.number("Block server port (empty: any free)", min=1, max=65535, format="%d")
            port.props("outlined").classes("flex-1")
            backups = (
                ui.select(
                    {0: "No backup PC", 1: "1 backup PC", 2: "2 backup PCs"},
                    label="Backups",
                    value=0,
                )
                .props("outlined")
                .classes("flex-1")
            )
        ui.label(
            "A backup PC holds a copy of other PCs' blocks and takes over at once when one of "
            "them stops."
        ).classes("tt-muted text-sm")
        error = ui.label().classes("text-negative")

        def show_source() -> None:
            local_box.set_visibility(source.value == "local")
            repo_box.set_visibility(source.value == "repository")

        source.on_value_change(show_source)
        show_source()
        button = ui.button("Create network").props('unelevated no-caps aria-label="Create network"')
    result = ui.column().classes("w-full max-w-2xl gap-4")

    async def start() -> None:
        error.set_text("")
        progress = Progress()
        from_repository = source.value == "repository"
        options = {
            "name": name.value or "",
            "model_id": (repo_model.value if from_repository else model.value) or "",
            "repository": (url.value or "").strip() if from_repository else None,
            "port": int(port.value) if port.value else None,
            "backups": int(backups.value or 0),
        }
        if from_repository and not options["repository"]:
            error.set_text("Give the repository's address.")
            return
        button.disable()

        def done() -> None:
            with result:
                _created(progress.config)

        with result:
            _progress_panel(progress, done)

        async def job() -> None:
            try:
                progress.config = await create_new_network(context, progress, **options)
            except SetupError as exc:
                progress.error = str(exc)
                button.enable()

        background_tasks.create(job(), name="create network")

    button.on_click(start)


def _created(config) -> None:
    """After "Create network": the chat, and how to invite the other PCs."""
    context = ui_context()
    info = context.node_info()
    with ui.column().classes("tt-card w-full p-5 gap-3"):
        ui.label(f"Network “{config.name}” is ready").classes("text-lg font-semibold")
        ui.label(
            f"Model {config.model_id}, this PC is its admin. Add PCs: on each one, open "
            "TikTrue and choose Join network (this network shows up there), or give it a "
            "one-time join token."
        ).classes("tt-muted")
        token_box = ui.column().classes("w-full gap-1")

        def make_token() -> None:
            token = create_join_token(context.data_dir, config.network_id)
            token_box.clear()
            with token_box:
                ui.label("One-time join token (valid 24 hours):").classes("text-sm tt-muted")
                ui.code(token, language="text").classes("w-full")
                ui.label(f"Admin address: {info['host']}:{info['control_port']}").classes(
                    "text-sm tt-muted"
                )

        with ui.row().classes("gap-2"):
            ui.button("Open the chat", on_click=lambda: ui.navigate.to("/chat")).props(
                'unelevated no-caps aria-label="Open the chat"'
            )
            ui.button("Make a join token", on_click=make_token).props(
                'outline no-caps aria-label="Make a join token"'
            )


async def _join_form() -> None:
    context = ui_context()
    info = context.node_info()
    ui.label(
        "TikTrue looks for networks on your LAN. Join one with a token from its admin, or ask "
        "the admin to approve this PC (this page waits for the answer)."
    ).classes("tt-muted max-w-3xl")
    with ui.column().classes("tt-card w-full p-5 gap-3"):
        with ui.row().classes("w-full items-center"):
            ui.label("Networks found on your LAN").classes("text-lg font-medium")
            ui.space()
            search = ui.button("Search again", icon="refresh").props(
                'flat no-caps aria-label="Search again"'
            )
        found = ui.column().classes("w-full gap-2")
    with ui.column().classes("tt-card w-full p-5 gap-3"):
        ui.label("Join").classes("text-lg font-medium")
        address = ui.input("Admin address (host:port)", placeholder="192.168.1.10:7470")
        address.props("outlined").classes("w-full")
        network = ui.input("Network id (to ask for approval)", placeholder="net-1a2b3c4d")
        network.props("outlined").classes("w-full")
        token = ui.input("Join token (optional: without one, the admin approves this PC)")
        token.props("outlined").classes("w-full")
        ui.label(
            f"This PC: {info['host']} (control port {info['control_port']}), node {info['node_id']}"
        ).classes("tt-muted text-sm")
        error = ui.label().classes("text-negative")
        button = ui.button("Join network").props('unelevated no-caps aria-label="Join network"')
    result = ui.column().classes("w-full gap-4")
    chosen: dict = {}

    async def look() -> None:
        search.props("loading")
        found.clear()
        with found:
            ui.label("Searching ...").classes("tt-muted")
        networks = await find_networks(context)
        found.clear()
        search.props(remove="loading")
        with found:
            if not networks:
                ui.label(
                    "No network found. If your LAN blocks multicast, type the admin's address "
                    "below."
                ).classes("tt-muted")
            for net in networks:
                admin = admin_address(net)
                with ui.row().classes("w-full items-center gap-3 p-2 rounded hover:bg-grey-2"):
                    ui.icon("lan", color="primary")
                    with ui.column().classes("gap-0 flex-1"):
                        ui.label(f"{net.name}  ·  {net.model_id}").classes("font-medium")
                        who = next((m for m in net.nodes if m.node_id == net.admin), None)
                        where = f"admin {who.name} at {admin[0]}" if who and admin else ""
                        ui.label(where or "admin not found").classes("tt-muted text-sm")
                    ui.button("Choose", on_click=lambda n=net, a=admin: pick(n, a)).props(
                        f'outline no-caps aria-label="Choose {net.name}"'
                    ).set_enabled(admin is not None)

    def pick(net, admin) -> None:
        address.set_value(admin[0])
        network.set_value(net.network_id)
        chosen["admin_node_id"] = admin[1]

    async def start() -> None:
        error.set_text("")
        if not (token.value or network.value):
            error.set_text("Give a join token, or the network id to ask for approval.")
            return
        progress = Progress()
        button.disable()

        def done() -> None:
            with result, ui.column().classes("tt-card w-full p-5 gap-3"):
                ui.label("This PC is in the network").classes("text-lg font-semibold")
                ui.button("Open the chat", on_click=lambda: ui.navigate.to("/chat")).props(
                    'unelevated no-caps aria-label="Open the chat"'
                )

        with result:
            _progress_panel(progress, done)

        async def job() -> None:
            try:
                await join_existing_network(
                    context,
                    progress,
                    admin=address.value or "",
                    token=token.value or None,
                    network_id=None if token.value else network.value,
                    admin_node_id=chosen.get("admin_node_id"),
                )
            except SetupError as exc:
                progress.error = str(exc)
                button.enable()

        background_tasks.create(job(), name="join network")

    search.on_click(look)
    button.on_click(start)
    await ui.context.client.connected()
    await asyncio.sleep(0)
    background_tasks.create(look(), name="discover networks")
