"""``/admin/tasks``: run a whitelisted task on a PC of the network and see its status and
output (the same as ``tiktrue tasks run``; every task is kept and listed), and read any PC's
recent log lines over the control channel (``tiktrue tasks logs``).

A task's name is an id and stays Latin; what it does is told in the person's language
(``TASK_WORDS``; a task of a newer node that this page does not know keeps its node's
words). What a task printed, its error and the log lines are the node's own words, shown
left-to-right as written (``tt-log``)."""

from __future__ import annotations

import asyncio

from nicegui import ui

from tiktrue.control.remote_tasks import (
    TaskError,
    TaskLog,
    available_tasks,
    node_log_lines,
    run_task,
)
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.ui.admin.operations import AdminOperations
from tiktrue.ui.admin.widgets import WIDE, data_table, network_frame, section, state_text
from tiktrue.ui.i18n import N_, _, fmt_datetime, latin, number, translate

LOG = "tt-log"  # the node's own words: left-to-right, as written
COLUMNS = [
    {"name": "number", "label": "#", "field": "number", "align": "left"},
    {"name": "time", "label": N_("Started"), "field": "time", "align": "left", **WIDE},
    {"name": "task", "label": N_("Task"), "field": "task", "align": "left"},
    {"name": "node", "label": N_("Node"), "field": "node", "align": "left"},
    {"name": "status", "label": N_("Status"), "field": "status", "align": "left"},
    {"name": "details", "label": N_("Error"), "field": "details", "align": "left", "classes": LOG},
]
SHOWN = 50
TASK_WORDS = {  # what each task of node_tasks.TASKS does, for people
    "verify_blocks": N_("re-hash the blocks of the network's model held here"),
    "collect_logs": N_("the last lines of the node's log (lines, level)"),
    "disk_usage": N_("what the data dir holds, and the disk's free space"),
    "speed_probe": N_("the compute benchmark the planner uses"),
    "clean_caches": N_("delete cached downloads (never live KV pages)"),
    "restart_node": N_("stop and start the node service"),
}


def task_words(name: str, description: str) -> str:
    """What task ``name`` does, in the person's language."""
    return translate(TASK_WORDS.get(name, description))


def _row(kept) -> dict:
    return {
        "id": kept.id,
        "number": number(kept.id),
        "time": fmt_datetime(kept.started_at),
        "task": latin(kept.task),
        "node": latin(kept.node_id),
        "status": state_text(kept.status),
        "details": kept.error or "",
    }


def _recent(data_dir, network_id: str) -> list:
    log = TaskLog(data_dir)
    try:
        return log.recent(SHOWN, network_id)
    finally:
        log.close()


def _progress(task: str, node: str, status: str) -> str:
    return _("{task} on {node}: {status}", task=task, node=node, status=status)


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/tasks")
    def tasks_page(network: str | None = None) -> None:
        with network_frame(ops, "tasks", network) as chosen:
            if chosen is None:
                return
            network_id = chosen["network_id"]
            config = read_config(config_path(context.data_dir, network_id))
            nodes = {
                n.node_id: _(
                    "{node} ({role}, {host})",
                    node=n.node_id,
                    role=state_text(n.role),
                    host=n.host,
                )
                for n in config.nodes
            }
            first = next(iter(nodes))
            section(_("Run a task"))
            with ui.row().classes("w-full items-end gap-2"):
                label = _("PC")
                node = (
                    ui.select(nodes, value=first, label=label)
                    .props(f'outlined dense aria-label="{label}"')
                    .classes("w-full sm:w-96")
                )
                label = _("Task")
                task = (
                    ui.select(
                        {
                            name: _("{task}: {what}", task=name, what=task_words(name, what))
                            for name, what in available_tasks().items()
                        },
                        value="disk_usage",
                        label=label,
                    )
                    .props(f'outlined dense aria-label="{label}"')
                    .classes("w-full sm:w-96")
                )
                run = ui.button(_("Run"), icon="play_arrow").props("unelevated no-caps")
            status = ui.label("").classes("tt-muted").props('data-testid="task-status"')
            output = ui.code("", language="text").classes(f"w-full {LOG}")
            output.set_visibility(False)
            section(_("Tasks sent"))
            table = data_table(COLUMNS, "id", _("No tasks sent yet"), pagination=10)

            async def refresh() -> None:
                kept = await asyncio.to_thread(_recent, context.data_dir, network_id)
                table.update_rows([_row(k) for k in kept])

            async def start() -> None:
                run.disable()
                status.set_text(_progress(task.value, node.value, _("sent …")))
                output.set_visibility(False)
                try:
                    kept = await run_task(
                        context.data_dir,
                        network_id,
                        node.value,
                        task.value,
                        on_update=lambda k: status.set_text(
                            _progress(k.task, k.node_id, state_text(k.status))
                        ),
                        events=context.events,
                    )
                except TaskError as exc:
                    status.set_text(
                        _(
                            "{task}: refused: {detail} ({code})",
                            task=task.value,
                            detail=str(exc),
                            code=exc.code,
                        )
                    )
                else:
                    status.set_text(_progress(kept.task, kept.node_id, state_text(kept.status)))
                    output.set_content(kept.output or kept.error or _("(no output)"))
                    output.set_visibility(True)
                finally:
                    run.enable()
                    await refresh()

            run.on_click(start)

            section(_("Log lines of a PC"))
            with ui.row().classes("w-full items-end gap-2"):
                label = _("PC whose log")
                log_node = (
                    ui.select(nodes, value=first, label=label)
                    .props(f'outlined dense aria-label="{label}"')
                    .classes("w-full sm:w-96")
                )
                label = _("Lines")
                level = (
                    ui.select(
                        {"": _("Every line"), "WARNING": _("Warnings and errors only")},
                        value="",
                        label=label,
                    )
                    .props(f'outlined dense aria-label="{label}"')
                    .classes("w-full sm:w-56")
                )
                show = ui.button(_("Show log"), icon="description").props("flat no-caps")
            label = _("Log lines")
            lines = (
                ui.log(max_lines=500).classes(f"w-full h-96 {LOG}").props(f'aria-label="{label}"')
            )

            async def show_log() -> None:
                try:
                    found = await node_log_lines(
                        context.data_dir, network_id, log_node.value, 200, level.value or None
                    )
                except TaskError as exc:
                    ui.notify(
                        _(
                            "The log could not be read: {detail} ({code})",
                            detail=str(exc),
                            code=exc.code,
                        ),
                        type="negative",
                        close_button=_("OK"),
                    )
                    return
                lines.clear()
                for line in found or [_("(the log is empty)")]:
                    lines.push(line)

            show.on_click(show_log)
            ui.timer(0.05, refresh, once=True)
