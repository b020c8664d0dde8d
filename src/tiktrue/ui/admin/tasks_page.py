"""``/admin/tasks``: run a whitelisted task on a PC of the network and see its status and
output (the same as ``tiktrue tasks run``; every task is kept and listed), and read any PC's
recent log lines over the control channel (``tiktrue tasks logs``)."""

from __future__ import annotations

import asyncio
from datetime import datetime

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
from tiktrue.ui.admin.widgets import data_table, network_frame, section

COLUMNS = [
    {"name": "id", "label": "#", "field": "id", "align": "left"},
    {"name": "time", "label": "Started", "field": "time", "align": "left"},
    {"name": "task", "label": "Task", "field": "task", "align": "left"},
    {"name": "node", "label": "Node", "field": "node", "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "align": "left"},
    {"name": "details", "label": "Error", "field": "details", "align": "left"},
]
SHOWN = 50


def _row(kept) -> dict:
    return {
        "id": kept.id,
        "time": datetime.fromtimestamp(kept.started_at).strftime("%Y-%m-%d %H:%M:%S"),
        "task": kept.task,
        "node": kept.node_id,
        "status": kept.status,
        "details": kept.error or "",
    }


def _recent(data_dir, network_id: str) -> list:
    log = TaskLog(data_dir)
    try:
        return log.recent(SHOWN, network_id)
    finally:
        log.close()


def register(context) -> None:
    ops: AdminOperations = context.admin

    @ui.page("/admin/tasks")
    def tasks_page(network: str | None = None) -> None:
        with network_frame(ops, "tasks", network) as chosen:
            if chosen is None:
                return
            network_id = chosen["network_id"]
            config = read_config(config_path(context.data_dir, network_id))
            nodes = {n.node_id: f"{n.node_id} ({n.role}, {n.host})" for n in config.nodes}
            first = next(iter(nodes))
            section("Run a task")
            with ui.row().classes("w-full items-end gap-2"):
                node = (
                    ui.select(nodes, value=first, label="PC")
                    .props('outlined dense aria-label="PC"')
                    .classes("w-full sm:w-96")
                )
                tasks = available_tasks()
                task = (
                    ui.select(
                        {name: f"{name}: {what}" for name, what in tasks.items()},
                        value="disk_usage",
                        label="Task",
                    )
                    .props('outlined dense aria-label="Task"')
                    .classes("w-full sm:w-96")
                )
                run = ui.button("Run", icon="play_arrow").props("unelevated no-caps")
            status = ui.label("").classes("tt-muted").props('data-testid="task-status"')
            output = ui.code("", language="text").classes("w-full")
            output.set_visibility(False)
            section("Tasks sent")
            table = data_table(COLUMNS, "id", "No tasks sent yet", pagination=10)

            async def refresh() -> None:
                kept = await asyncio.to_thread(_recent, context.data_dir, network_id)
                table.update_rows([_row(k) for k in kept])

            async def start() -> None:
                run.disable()
                status.set_text(f"{task.value} on {node.value}: sent ...")
                output.set_visibility(False)
                try:
                    kept = await run_task(
                        context.data_dir,
                        network_id,
                        node.value,
                        task.value,
                        on_update=lambda k: status.set_text(f"{k.task} on {k.node_id}: running"),
                        events=context.events,
                    )
                except TaskError as exc:
                    status.set_text(f"{task.value}: refused: {exc} ({exc.code})")
                else:
                    status.set_text(f"{kept.task} on {kept.node_id}: {kept.status}")
                    output.set_content(kept.output or kept.error or "(no output)")
                    output.set_visibility(True)
                finally:
                    run.enable()
                    await refresh()

            run.on_click(start)

            section("Log lines of a PC")
            with ui.row().classes("w-full items-end gap-2"):
                log_node = (
                    ui.select(nodes, value=first, label="PC whose log")
                    .props('outlined dense aria-label="PC whose log"')
                    .classes("w-full sm:w-96")
                )
                level = (
                    ui.select(
                        {"": "every line", "WARNING": "warnings and errors"},
                        value="",
                        label="Lines",
                    )
                    .props('outlined dense aria-label="Lines"')
                    .classes("w-48")
                )
                show = ui.button("Show log", icon="description").props("flat no-caps")
            lines = ui.log(max_lines=500).classes("w-full h-96").props('aria-label="Log lines"')

            async def show_log() -> None:
                try:
                    found = await node_log_lines(
                        context.data_dir, network_id, log_node.value, 200, level.value or None
                    )
                except TaskError as exc:
                    ui.notify(f"{exc} ({exc.code})", type="negative", close_button="OK")
                    return
                lines.clear()
                for line in found or ["(the log is empty)"]:
                    lines.push(line)

            show.on_click(show_log)
            ui.timer(0.05, refresh, once=True)
