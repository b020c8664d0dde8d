"""Whitelisted tasks (seed 002's agent tasks): the fixed list of things a node runs when its
network's admin (or its own CLI) asks, with their status and output. Nothing outside
``TASKS`` runs: a name not on the list is refused here, by the node, whatever the sender; who
may send one at all is the control channel's role table (``security.access_control``).

Each task takes a few checked arguments (pydantic, extra fields refused), runs off the event
loop, and ends ``done`` with its output or ``failed`` with why. Every task is written to the
node's event log when it starts and when it ends. The node keeps the last ``KEPT`` tasks in
memory for ``task_status``; the admin keeps every task it sent in its own database.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tiktrue.model.store import BlockStore
from tiktrue.monitoring.node_logging import MAX_LINES, tail_log
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.security.node_tls import block_keyring

log = logging.getLogger("tiktrue.tasks")
KEPT = 100
RUNNING, DONE, FAILED = "running", "done", "failed"
MAX_OUTPUT_CHARS = 256 * 1024  # a task's output kept and sent back (the log's tail is less)


class TaskRefused(Exception):
    """Not on the whitelist, or bad arguments; ``code`` for the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogArgs(NoArgs):
    lines: int = Field(200, ge=1, le=MAX_LINES)
    level: str | None = Field(None, pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")


@dataclass
class TaskHooks:
    """What some tasks need from the node service: its speed probe, a restart, and which
    model a network runs here (None: the node holds none for it)."""

    probe: Callable[[], float]  # weight bytes per ms, as the planner measures (blocking)
    restart: Callable[[], None]  # after the reply: stop and start the node process again
    on_event: Callable[..., Any] = lambda *a, **k: None  # the node's event log


@dataclass
class TaskRecord:
    id: str
    task: str
    network_id: str | None
    args: dict
    status: str = RUNNING
    output: str = ""
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskSpec:
    description: str
    args: type[BaseModel]
    run: Callable[[Path, str | None, BaseModel, TaskHooks], str]  # blocking; returns output


def _verify_blocks(data_dir: Path, network_id: str | None, args, hooks) -> str:
    if network_id is None:
        raise TaskRefused("bad_request", "verify_blocks needs the network whose blocks to check")
    config = read_config(config_path(data_dir, network_id))
    store = BlockStore(Path(data_dir) / "models" / config.model_id, keyring=block_keyring(data_dir))
    order = store.manifest.model_chain_order
    held = [name for name in order if store.has_block(name)]
    lines, bad = [], 0
    for name in held:
        problem = store.check_block(name)
        bad += problem is not None
        lines.append(f"{name}: {'ok' if problem is None else problem}")
    lines.append(f"{len(held) - bad} of {len(held)} blocks of {config.model_id} verified")
    return "\n".join(lines)


def _collect_logs(data_dir: Path, network_id, args: LogArgs, hooks) -> str:
    return "\n".join(tail_log(data_dir, args.lines, args.level))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _disk_usage(data_dir: Path, network_id, args, hooks) -> str:
    data_dir = Path(data_dir)
    lines = []
    for path in sorted(data_dir.iterdir()):
        try:
            lines.append(f"{path.name:<28} {_size(path) / 2**20:12.1f} MiB")
        except OSError as exc:  # a file removed meanwhile
            lines.append(f"{path.name:<28} ? ({exc.strerror})")
    models = data_dir / "models"
    if models.is_dir():
        for model in sorted(models.iterdir()):
            lines.append(f"  models/{model.name:<20} {_size(model) / 2**20:12.1f} MiB")
    total, used, free = shutil.disk_usage(data_dir)
    lines.append(f"disk: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    return "\n".join(lines)


def _speed_probe(data_dir, network_id, args, hooks: TaskHooks) -> str:
    rate = hooks.probe()
    return f"{rate:.0f} weight bytes per ms ({rate / 1e6:.2f} GB/s), as a decode step reads them"


def _clean_caches(data_dir: Path, network_id, args, hooks) -> str:
    """Downloads kept for later (``<data>/cache``) but not the KV pages spilled for live
    sessions (``cache/kv``, still in use)."""
    cache = Path(data_dir) / "cache"
    freed, removed = 0, []
    if cache.is_dir():
        for item in sorted(cache.iterdir()):
            if item.name == "kv":
                continue
            freed += _size(item)
            shutil.rmtree(item) if item.is_dir() else item.unlink()
            removed.append(item.name)
    what = ", ".join(removed) or "nothing"
    return f"removed {what} from the cache: {freed / 2**20:.1f} MiB freed"


def _restart_node(data_dir, network_id, args, hooks: TaskHooks) -> str:
    hooks.restart()
    return "the node service restarts now; it answers again once it has started"


TASKS: dict[str, TaskSpec] = {
    "verify_blocks": TaskSpec(
        "re-hash the blocks of the network's model held here", NoArgs, _verify_blocks
    ),
    "collect_logs": TaskSpec(
        "the last lines of the node's log (lines, level)", LogArgs, _collect_logs
    ),
    "disk_usage": TaskSpec(
        "what the data dir holds, and the disk's free space", NoArgs, _disk_usage
    ),
    "speed_probe": TaskSpec("the compute benchmark the planner uses", NoArgs, _speed_probe),
    "clean_caches": TaskSpec(
        "delete cached downloads (never live KV pages)", NoArgs, _clean_caches
    ),
    "restart_node": TaskSpec("stop and start the node service", NoArgs, _restart_node),
}


def check_task(task: object, args: object) -> tuple[TaskSpec, BaseModel]:
    """The task's spec and checked arguments; raises ``TaskRefused``."""
    spec = TASKS.get(task) if isinstance(task, str) else None
    if spec is None:
        allowed = ", ".join(TASKS)
        raise TaskRefused(
            "task_not_allowed", f"{str(task)[:64]!r} is not a task (tasks: {allowed})"
        )
    try:
        return spec, spec.args.model_validate(args or {})
    except ValidationError as exc:
        raise TaskRefused("bad_request", f"arguments of {task}: {exc.errors()[0]['msg']}") from None


class TaskRunner:
    """The node's tasks: started, run in a thread, kept (the last ``KEPT``)."""

    def __init__(self, data_dir: Path, hooks: TaskHooks) -> None:
        self.data_dir = Path(data_dir)
        self.hooks = hooks
        self.tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self._running: set[asyncio.Task] = set()

    def start(self, task: object, args: object, network_id: str | None, by: str) -> TaskRecord:
        spec, checked = check_task(task, args)
        record = TaskRecord(uuid.uuid4().hex[:12], str(task), network_id, checked.model_dump())
        self.tasks[record.id] = record
        while len(self.tasks) > KEPT:
            self.tasks.popitem(last=False)
        self.hooks.on_event(
            "task_started", network_id=network_id, task=record.task, task_id=record.id, by=by
        )
        job = asyncio.get_running_loop().create_task(self._run(record, spec, checked))
        self._running.add(job)
        job.add_done_callback(self._running.discard)
        return record

    async def _run(self, record: TaskRecord, spec: TaskSpec, args: BaseModel) -> None:
        try:
            output = await asyncio.to_thread(
                spec.run, self.data_dir, record.network_id, args, self.hooks
            )
            record.output, record.status = output[-MAX_OUTPUT_CHARS:], DONE
        except Exception as exc:  # the task failed; the node goes on
            log.warning("task %s (%s) failed: %s", record.id, record.task, exc)
            record.status, record.error = FAILED, str(exc) or type(exc).__name__
        record.finished_at = time.time()
        self.hooks.on_event(
            "task_finished",
            level="info" if record.status == DONE else "warning",
            network_id=record.network_id,
            task=record.task,
            task_id=record.id,
            status=record.status,
            error=record.error,
        )

    def status(self, task_id: object) -> TaskRecord:
        record = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if record is None:
            raise TaskRefused("not_found", f"no task {str(task_id)[:40]!r} on this node")
        return record

    async def stop(self) -> None:
        for job in list(self._running):
            job.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
