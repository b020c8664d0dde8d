"""Long admin jobs (apply a plan, download, import or verify a model) with their progress.

A job runs as a task on the node's event loop (blocking parts in a thread); the dashboard and
``GET /api/admin/jobs/{id}`` read its progress while it runs. Progress callbacks may be called
from a worker thread: they only assign plain attributes, which readers see whole.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tiktrue.ui.admin.errors import AdminError, as_admin_error
from tiktrue.ui.i18n import N_

log = logging.getLogger("tiktrue.admin")

RUNNING, DONE, FAILED = "running", "done", "failed"
KEEP = 50  # finished jobs remembered (newest first)


@dataclass
class Job:
    """One long operation. ``done``/``total`` count its units (bytes, blocks); ``parts`` the
    same per part (per node while a plan's blocks are pushed)."""

    id: str
    kind: str  # apply | download | import | verify
    title: str
    state: str = RUNNING
    step: str = N_("starting")  # what it does now, for people (a Message: translated where shown)
    done: float = 0.0
    total: float = 0.0
    parts: dict[str, dict] = field(default_factory=dict)
    result: Any = None
    error: dict | None = None  # {"code", "message"} when failed
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def fraction(self) -> float | None:
        """0..1, or None while the size of the work is unknown."""
        if self.state == DONE:
            return 1.0
        return min(1.0, self.done / self.total) if self.total else None

    def progress(self, done: float, total: float, step: str | None = None) -> None:
        self.done, self.total = done, total
        if step is not None:
            self.step = step

    def part(self, name: str, done: float, total: float, step: str = "") -> None:
        self.parts[name] = {"done": done, "total": total, "step": step}

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "state": self.state,
            "step": self.step,
            "done": self.done,
            "total": self.total,
            "fraction": self.fraction,
            "parts": {k: dict(v) for k, v in self.parts.items()},
            "result": self.result,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobBoard:
    """The jobs of this admin node, running and recently finished."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._ids = itertools.count(1)

    def start(self, kind: str, title: str, work: Callable[[Job], Awaitable[Any]]) -> Job:
        """Run ``work(job)`` as a task (on the running loop); its return value is the result
        (its ``summary``, if any, the last step shown), a refusal becomes the job's error."""
        job = Job(id=f"job-{next(self._ids)}", kind=kind, title=title)
        self._jobs[job.id] = job
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, work))
        self._forget_old()
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[Any]]) -> None:
        try:
            job.result = await work(job)
            summary = job.result.get("summary") if isinstance(job.result, dict) else None
            job.state, job.step = DONE, summary or N_("done")
        except asyncio.CancelledError:
            job.state, job.error = FAILED, {"code": "cancelled", "message": N_("stopped")}
            raise
        except Exception as exc:
            error = as_admin_error(exc)
            if error.code == "internal_error":
                log.exception("admin job %s (%s) failed", job.id, job.title)
            job.state, job.error = FAILED, {"code": error.code, "message": error.message}
        finally:
            job.finished_at = time.time()
            self._tasks.pop(job.id, None)

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise AdminError("not_found", N_("no job {job}", job=job_id), 404)
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.started_at, reverse=True)

    def running(self, kind: str, title: str) -> Job | None:
        """The job doing this now, if one is (a second click must not start it twice)."""
        for job in self._jobs.values():
            if job.state == RUNNING and (job.kind, job.title) == (kind, title):
                return job
        return None

    async def wait(self, job_id: str) -> Job:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return self.get(job_id)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_old(self) -> None:
        finished = [j for j in self.list() if j.state != RUNNING]
        for job in finished[self.keep :]:
            del self._jobs[job.id]
