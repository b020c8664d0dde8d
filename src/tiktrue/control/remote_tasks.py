"""The admin's side of whitelisted tasks and remote log lines: send a task to a node of a
network over the control channel (with the admin's certificate of that network), follow it to
its end, and keep it, with its status and output, in the admin's ``tiktrue.db``; every task is
also in the admin's event log. ``tiktrue tasks run|list|show`` and the dashboard's Tasks page
both use these functions. The node itself decides what runs (``node.node_tasks``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiktrue.control.network_admin import load
from tiktrue.database import Database
from tiktrue.monitoring.monitoring_system import EventLog
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.node_tasks import DONE, FAILED, RUNNING, TASKS
from tiktrue.node.peer_link import PeerUnavailable

COMPONENT = "tasks"
MIGRATIONS = [
    [
        "CREATE TABLE tasks ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " network_id TEXT NOT NULL, node_id TEXT NOT NULL, task TEXT NOT NULL,"
        " args TEXT NOT NULL, status TEXT NOT NULL, output TEXT NOT NULL DEFAULT '',"
        " error TEXT, remote_id TEXT, started_at REAL NOT NULL, finished_at REAL)",
        "CREATE INDEX tasks_started ON tasks (started_at)",
    ]
]
POLL_S = 0.5
TASK_CEILING_S = 30 * 60.0  # a task still running after this is given up (marked failed)
UNREACHABLE = (PeerUnavailable, OSError, asyncio.TimeoutError)


class TaskError(Exception):
    """A task could not be sent or was refused; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class KeptTask:
    id: int
    network_id: str
    node_id: str
    task: str
    args: dict
    status: str
    output: str
    error: str | None
    started_at: float
    finished_at: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class TaskLog:
    """The tasks this admin sent, in its ``tiktrue.db``."""

    def __init__(self, data_dir: Path) -> None:
        self.db = Database.open(Path(data_dir))
        self.db.migrate(COMPONENT, MIGRATIONS)

    def close(self) -> None:
        self.db.close()

    def add(self, network_id: str, node_id: str, task: str, args: dict) -> int:
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO tasks (network_id, node_id, task, args, status, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (network_id, node_id, task, json.dumps(args), RUNNING, time.time()),
            )
        return int(cursor.lastrowid)

    def update(self, task_id: int, **fields) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE tasks SET {names} WHERE id = ?", (*fields.values(), task_id))

    def get(self, task_id: int) -> KeptTask | None:
        rows = self.db.query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return _kept(rows[0]) if rows else None

    def recent(self, limit: int = 50, network_id: str | None = None) -> list[KeptTask]:
        if network_id is None:
            rows = self.db.query("SELECT * FROM tasks ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.db.query(
                "SELECT * FROM tasks WHERE network_id = ? ORDER BY id DESC LIMIT ?",
                (network_id, limit),
            )
        return [_kept(r) for r in rows]


def _kept(row) -> KeptTask:
    return KeptTask(
        row["id"],
        row["network_id"],
        row["node_id"],
        row["task"],
        json.loads(row["args"]),
        row["status"],
        row["output"],
        row["error"],
        row["started_at"],
        row["finished_at"],
    )


def _node(config, node_id: str):
    found = [n for n in config.nodes if n.node_id == node_id or n.node_id.startswith(node_id)]
    if len(found) != 1:
        known = ", ".join(n.node_id for n in config.nodes)
        raise TaskError("not_found", f"no single node {node_id!r} in {config.network_id} ({known})")
    return found[0]


async def run_task(
    data_dir: Path,
    network_id: str,
    node_id: str,
    task: str,
    args: dict | None = None,
    *,
    on_update: Callable[[KeptTask], None] | None = None,
    events: EventLog | None = None,
    ceiling_s: float = TASK_CEILING_S,
) -> KeptTask:
    """Send ``task`` to a node of the network and follow it to its end; kept and logged
    whatever comes of it. The node refuses names outside its whitelist (no check here: the
    node is the judge). Raises ``TaskError`` when the node cannot be reached or refuses."""
    config, credentials = load(data_dir, network_id)
    node = _node(config, node_id)
    args = dict(args or {})
    log = TaskLog(data_dir)
    own_events = events is None
    events = events or EventLog(data_dir)
    task_id = await asyncio.to_thread(log.add, network_id, node.node_id, task, args)
    remote: dict | None = None  # the node's record, once it took the task

    async def finish(status: str, output: str = "", error: str | None = None) -> KeptTask:
        await asyncio.to_thread(
            log.update,
            task_id,
            status=status,
            output=output,
            error=error,
            finished_at=time.time(),
        )
        events.log_system_events(
            "task",
            level="info" if status == DONE else "warning",
            network_id=network_id,
            node_id=node.node_id,
            task=task,
            task_id=task_id,
            status=status,
            error=error,
        )
        return await asyncio.to_thread(log.get, task_id)

    try:
        try:
            async with ControlLink.to(node, credentials) as link:
                started = await link.call("task_start", network_id=network_id, task=task, args=args)
                remote = started["task"]
                await asyncio.to_thread(log.update, task_id, remote_id=remote["id"])
                deadline = time.monotonic() + ceiling_s
                while remote["status"] == RUNNING:
                    if on_update is not None:
                        on_update(await asyncio.to_thread(log.get, task_id))
                    if time.monotonic() > deadline:
                        return await finish(FAILED, error=f"still running after {ceiling_s:.0f} s")
                    await asyncio.sleep(POLL_S)
                    remote = (
                        await link.call("task_status", network_id=network_id, task_id=remote["id"])
                    )["task"]
        except ControlError as exc:
            await finish(FAILED, error=exc.message)
            raise TaskError(exc.code, exc.message) from None
        except UNREACHABLE as exc:
            if task == "restart_node" and remote is not None:
                return await finish(DONE, "the node went down to restart")
            await finish(FAILED, error=f"the node cannot be reached: {exc}")
            raise TaskError(
                "unreachable", f"node {node.node_id} cannot be reached: {exc}"
            ) from None
        return await finish(remote["status"], remote.get("output") or "", remote.get("error"))
    finally:
        log.close()
        if own_events:
            events.close()


async def node_log_lines(
    data_dir: Path, network_id: str, node_id: str, lines: int = 200, level: str | None = None
) -> list[str]:
    """A node's recent log lines, over the control channel (members of the network)."""
    config, credentials = load(data_dir, network_id)
    node = _node(config, node_id)
    try:
        async with ControlLink.to(node, credentials) as link:
            reply = await link.call(
                "logs", network_id=network_id, lines=lines, **({"level": level} if level else {})
            )
    except ControlError as exc:
        raise TaskError(exc.code, exc.message) from None
    except UNREACHABLE as exc:
        raise TaskError("unreachable", f"node {node.node_id} cannot be reached: {exc}") from None
    return list(reply["lines"])


def available_tasks() -> dict[str, str]:
    """The whitelist, name -> what it does (what the nodes of this version run)."""
    return {name: spec.description for name, spec in TASKS.items()}
