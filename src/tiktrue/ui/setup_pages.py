"""First run of a PC (admins only): ``/setup`` offers "Create new network" and "Join network";
``/setup/create`` and ``/setup/join`` run those flows with their progress (the model's
download, this PC's blocks) until the network works. The work itself is
``tiktrue.ui.network_setup``'s.
"""

from __future__ import annotations

import asyncio

from nicegui import background_tasks, ui

from tiktrue.control.join import create_join_token
from tiktrue.control.network_manager import list_joined_networks
from tiktrue.ui.context import ui_context
from tiktrue.ui.i18n import _, isolate, ngettext, translate
from tiktrue.ui.layout import copy_text, page_frame, require_admin
from tiktrue.ui.network_setup import (
    Progress,
    SetupError,
    admin_address,
    create_new_network,
    find_networks,
    join_existing_network,
    local_models,
)
from tiktrue.ui.trust_page import reach_card

POLL_S = 0.3  # how often a progress panel reads its job's figures


def register() -> None:
    @ui.page("/setup")
    def setup() -> None:
        if require_admin() is None:
            return
        with page_frame(_("Set up this PC")):
            ui.label(
                _(
                    "TikTrue splits one language model across the PCs of your LAN. Create a "
                    "new network on this PC (it becomes the network's admin), or join a "
                    "network that another PC administers."
                )
            ).classes("tt-muted max-w-3xl")
            reach_card()
            with ui.row().classes("w-full gap-4 items-stretch"):
                _choice(
                    _("Create new network"),
                    "add_circle",
                    _(
                        "This PC holds the model and invites the other PCs. Choose a model "
                        "from this PC or download one from a model repository."
                    ),
                    "/setup/create",
                )
                _choice(
                    _("Join network"),
                    "group_add",
                    _(
                        "Give this PC's CPU, memory and disk to a network found on your LAN, "
                        "with a join token or the admin's approval."
                    ),
                    "/setup/join",
                )
            joined = list_joined_networks(ui_context().data_dir)
            if joined:
                ui.label(_("Networks of this PC")).classes("text-lg font-medium mt-4")
                for config in joined:
                    pcs = ngettext("{n} PC", "{n} PCs", len(config.nodes))
                    parts = (config.name, config.model_id, pcs)
                    ui.label(" · ".join(isolate(p) for p in parts))

    @ui.page("/setup/create")
    def create() -> None:
        if require_admin() is None:
            return
        with page_frame(_("Create new network")):
            _create_form()

    @ui.page("/setup/join")
    async def join() -> None:
        if require_admin() is None:
            return
        with page_frame(_("Join network")):
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
            title = _("Model download")
            ui.label(title).classes("text-sm tt-muted")
            download = ui.linear_progress(show_value=False).props(f'aria-label="{title}"')
            download_text = ui.label().classes("text-sm tt-muted")
        with ui.column().classes("w-full gap-1") as blocks_box:
            title = _("Blocks on this PC")
            ui.label(title).classes("text-sm tt-muted")
            blocks = ui.linear_progress(show_value=False).props(f'aria-label="{title}"')
            blocks_text = ui.label().classes("text-sm tt-muted")
        error = ui.label().classes("text-negative")
    finished = []

    def refresh() -> None:
        step.set_text(translate(progress.step))
        download_box.set_visibility(progress.download is not None)
        download.set_value(progress.download or 0.0)
        download_text.set_text(translate(progress.download_text))
        blocks_box.set_visibility(progress.blocks is not None)
        blocks.set_value(progress.blocks or 0.0)
        blocks_text.set_text(translate(progress.blocks_text))
        error.set_text(translate(progress.error))
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
    models = {k: translate(v) for k, v in local_models(context.data_dir).items()}
    with ui.column().classes("tt-card w-full max-w-2xl p-6 gap-4") as form:
        name = ui.input(_("Network name"), value=_("Office")).props("outlined").classes("w-full")
        where = _("Where the model comes from")
        source = ui.toggle(
            {"local": _("A model on this PC"), "repository": _("A model repository")},
            value="local" if models else "repository",
        ).props(f'no-caps aria-label="{where}"')
        with ui.column().classes("w-full gap-3") as local_box:
            model = (
                ui.select(models, label=_("Model"), value=next(iter(models), None))
                .props("outlined")
                .classes("w-full")
            )
            if not models:
                ui.label(
                    _(
                        "No model on this PC yet: import one ({command}) or use a model "
                        "repository.",
                        command="tiktrue models import",
                    )
                ).classes("tt-muted text-sm")
        with ui.column().classes("w-full gap-3") as repo_box:
            url = ui.input(_("Repository address"), placeholder="http://192.168.1.20:8765")
            url.props("outlined").classes("w-full tt-ltr")
            repo_model = ui.input(_("Model id in the repository"), placeholder="smollm2-135m")
            repo_model.props("outlined").classes("w-full tt-ltr")
        with ui.row().classes("w-full gap-4"):  # side by side; stacked on a phone
            port = ui.number(_("Block server port"), min=1, max=65535, format="%d")
            hint = _("Empty: any free port")
            port.props(f'outlined hint="{hint}"').classes("flex-1 min-w-[14rem]")
            backups = (
                ui.select(
                    {0: _("No backup PC"), 1: _("1 backup PC"), 2: _("2 backup PCs")},
                    label=_("Backups"),
                    value=0,
                )
                .props("outlined")
                .classes("flex-1 min-w-[14rem]")
            )
        ui.label(
            _(
                "A backup PC holds a copy of other PCs' blocks and takes over at once when one "
                "of them stops."
            )
        ).classes("tt-muted text-sm")
        error = ui.label().classes("text-negative")

        def show_source() -> None:
            local_box.set_visibility(source.value == "local")
            repo_box.set_visibility(source.value == "repository")

        source.on_value_change(show_source)
        show_source()
        label = _("Create network")
        button = ui.button(label).props(f'unelevated no-caps aria-label="{label}"')
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
            error.set_text(_("Give the repository's address."))
            return
        button.disable()

        def done() -> None:
            form.set_visibility(False)  # what was asked is done: the result takes its place
            with result:
                _created(progress.config)

        result.clear()  # a failed try's panel
        with result:
            _progress_panel(progress, done)
        _scroll_to(result)

        async def job() -> None:
            try:
                progress.config = await create_new_network(context, progress, **options)
            except SetupError as exc:
                progress.error = exc.args[0]
                button.enable()

        background_tasks.create(job(), name="create network")

    button.on_click(start)


def _created(config) -> None:
    """After "Create network": the chat, and how to invite the other PCs."""
    context = ui_context()
    info = context.node_info()
    with ui.column().classes("tt-card w-full p-5 gap-3"):
        ui.label(_("Network “{name}” is ready", name=config.name)).classes("text-lg font-semibold")
        ui.label(
            _(
                "Model {model}, this PC is its admin. Add PCs: on each one, open TikTrue and "
                "choose Join network (this network shows up there), or give it a one-time join "
                "token.",
                model=config.model_id,
            )
        ).classes("tt-muted")
        token_box = ui.column().classes("w-full gap-3")

        def make_token() -> None:
            token = create_join_token(context.data_dir, config.network_id)
            token_box.clear()
            with token_box:
                _copyable(_("Admin address"), f"{info['host']}:{info['control_port']}")
                _copyable(_("One-time join token"), token, _("Valid 24 hours, for one PC"))

        with ui.row().classes("gap-2"):
            _open_chat_button()
            label = _("Make a join token")
            ui.button(label, on_click=make_token).props(f'outline no-caps aria-label="{label}"')


def _open_chat_button() -> None:
    label = _("Open the chat")
    ui.button(label, on_click=lambda: ui.navigate.to("/chat")).props(
        f'unelevated no-caps aria-label="{label}"'
    )


def _scroll_to(element: ui.element) -> None:
    """Bring ``element`` into view (a panel that appears below the fold of a phone)."""
    ui.run_javascript(f"getHtmlElement({element.id}).scrollIntoView({{behavior: 'smooth'}})")


def _copyable(label: str, value: str, hint: str = "") -> None:
    """A read-only field with a copy button: what a person types on another PC."""
    field = ui.input(label, value=value).props(f'filled readonly hint="{hint}"')
    field.classes("w-full tt-ltr")
    with field.add_slot("append"):
        name = _("Copy {what}", what=label)
        ui.button(icon="content_copy", on_click=lambda: copy_text(value, label)).props(
            f'flat round dense aria-label="{name}"'
        ).tooltip(_("Copy"))


async def _join_form() -> None:
    context = ui_context()
    info = context.node_info()
    ui.label(
        _(
            "TikTrue looks for networks on your LAN. Join one with a token from its admin, or "
            "ask the admin to approve this PC (this page waits for the answer)."
        )
    ).classes("tt-muted max-w-3xl")
    with ui.column().classes("tt-card w-full p-5 gap-3"):
        with ui.row().classes("w-full items-center"):
            ui.label(_("Networks found on your LAN")).classes("text-lg font-medium")
            ui.space()
            label = _("Search again")
            search = ui.button(label, icon="refresh").props(f'flat no-caps aria-label="{label}"')
        found = ui.column().classes("w-full gap-2")
    with ui.column().classes("tt-card w-full p-5 gap-3") as form:
        ui.label(_("Join")).classes("text-lg font-medium")
        address = ui.input(_("Admin address"), placeholder="192.168.1.10:7470")
        hint = _("host:port, as the admin PC shows it")
        address.props(f'outlined hint="{hint}"').classes("w-full tt-ltr")
        network = ui.input(_("Network id"), placeholder="net-1a2b3c4d")
        hint = _("To ask the admin for approval")
        network.props(f'outlined hint="{hint}"').classes("w-full tt-ltr")
        token = ui.input(_("Join token"))
        hint = _("Optional; without one, the admin approves")
        token.props(f'outlined hint="{hint}"')
        token.classes("w-full tt-ltr")
        ui.label(
            _(
                "This PC: {host} (control port {port}), node {node}",
                host=info["host"],
                port=str(info["control_port"]),
                node=info["node_id"],
            )
        ).classes("tt-muted text-sm")
        error = ui.label().classes("text-negative")
        label = _("Join network")
        button = ui.button(label).props(f'unelevated no-caps aria-label="{label}"')
    result = ui.column().classes("w-full gap-4")
    chosen: dict = {}

    async def look() -> None:
        search.disable()
        found.clear()
        with found, ui.row().classes("items-center gap-2"):
            ui.spinner(size="sm")
            ui.label(_("Searching ...")).classes("tt-muted")
        networks = await find_networks(context)
        found.clear()
        search.enable()
        with found:
            if not networks:
                ui.label(
                    _(
                        "No network found. If your LAN blocks multicast, type the admin's "
                        "address below."
                    )
                ).classes("tt-muted")
            for net in networks:
                admin = admin_address(net)
                with ui.row().classes("w-full items-center gap-3 p-2 rounded hover:bg-grey-2"):
                    ui.icon("lan", color="primary")
                    with ui.column().classes("gap-0 flex-1"):
                        ui.label(f"{net.name}  ·  {net.model_id}").classes("font-medium")
                        who = next((m for m in net.nodes if m.node_id == net.admin), None)
                        where = (
                            _("admin {name} at {address}", name=who.name, address=admin[0])
                            if who and admin
                            else _("admin not found")
                        )
                        ui.label(where).classes("tt-muted text-sm")
                    name = _("Choose {network}", network=net.name)
                    ui.button(_("Choose"), on_click=lambda n=net, a=admin: pick(n, a)).props(
                        f'outline no-caps aria-label="{name}"'
                    ).set_enabled(admin is not None)

    def pick(net, admin) -> None:
        address.set_value(admin[0])
        network.set_value(net.network_id)
        chosen["admin_node_id"] = admin[1]

    async def start() -> None:
        error.set_text("")
        if not (token.value or network.value):
            error.set_text(_("Give a join token, or the network id to ask for approval."))
            return
        progress = Progress()
        button.disable()

        def done() -> None:
            form.set_visibility(False)
            with result, ui.column().classes("tt-card w-full p-5 gap-3"):
                ui.label(_("This PC is in the network")).classes("text-lg font-semibold")
                _open_chat_button()

        result.clear()  # a failed try's panel
        with result:
            _progress_panel(progress, done)
        _scroll_to(result)

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
                progress.error = exc.args[0]
                button.enable()

        background_tasks.create(job(), name="join network")

    search.on_click(look)
    button.on_click(start)
    await ui.context.client.connected()
    await asyncio.sleep(0)
    background_tasks.create(look(), name="discover networks")
