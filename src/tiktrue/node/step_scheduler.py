"""``StepScheduler``: the order in which one worker runs the forward steps of all sessions.

Continuous batching: the decode steps (one new position each) of every session ready at the
same moment run as one batched forward on the engine thread; steps that arrive meanwhile wait
for the next round. A prompt's chunk (several positions) runs alone, one chunk per round after
the round's decode batch, so a long prompt delays the other sessions' tokens by one chunk at a
time, never by the whole prompt.

A lone session is not slowed: a round starts as soon as the engine is free. Only when sessions
of the last round are missing (their next step is still on its way through the gateway) does a
round wait for them, at most ``gather_s``, so they stay in one batch instead of splitting into
a batch and a straggler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

Job = TypeVar("Job")
GATHER_S = 0.002


@dataclass
class _Waiting(Generic[Job]):
    key: str  # the session
    job: Job
    future: asyncio.Future


@dataclass
class SchedulerStats:
    steps: int = 0  # steps run
    batched_steps: int = 0  # of which in a batch of two or more
    rounds: int = 0  # engine calls
    largest_batch: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepScheduler(Generic[Job]):
    """Runs jobs with ``run_batch(jobs) -> results`` (one result or exception per job) on
    ``executor``: every batchable job queued at the start of a round together, then one
    job that is not."""

    def __init__(
        self,
        executor: Executor,
        run_batch: Callable[[list[Job]], list[Any]],
        *,
        gather_s: float = GATHER_S,
    ) -> None:
        self._executor = executor
        self._run_batch = run_batch
        self.gather_s = gather_s
        self._batchable: list[_Waiting[Job]] = []
        self._alone: list[_Waiting[Job]] = []
        self._pump: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self._last_round: set[str] = set()
        self.stats = SchedulerStats()

    async def run(self, key: str, job: Job, *, batchable: bool) -> Any:
        """The result of ``job`` (a step of session ``key``), or its exception raised."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(key, job, loop.create_future())
        (self._batchable if batchable else self._alone).append(waiting)
        if self._arrived is not None:
            self._arrived.set()
        if self._pump is None:  # starts on the next turn of the loop: steps of this turn join
            self._pump = loop.create_task(self._rounds())
        return await waiting.future

    def close(self) -> None:
        """Stop: every step still queued or running fails (cancelled)."""
        if self._pump is not None:
            self._pump.cancel()
        for waiting in [*self._batchable, *self._alone]:
            waiting.future.cancel()
        self._batchable, self._alone = [], []

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._batchable or self._alone:
                await self._gather()
                batch, self._batchable = self._batchable, []
                if batch:
                    await self._round(loop, batch)
                    self._last_round = {w.key for w in batch}
                if self._alone:
                    await self._round(loop, [self._alone.pop(0)])
        finally:
            self._pump = None

    async def _gather(self) -> None:
        """Wait (at most ``gather_s``) for the sessions of the last round that are missing."""
        if not self._batchable or not self._last_round:
            return
        deadline = asyncio.get_running_loop().time() + self.gather_s
        while True:
            missing = self._last_round - {w.key for w in self._batchable}
            left = deadline - asyncio.get_running_loop().time()
            if not missing or left <= 0 or self._alone:
                return
            self._arrived = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
            self._arrived = None

    async def _round(self, loop, batch: list[_Waiting[Job]]) -> None:
        jobs = [w.job for w in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, jobs)
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.future.cancel()
            raise
        except Exception as exc:  # the executor is shut down, or run_batch itself failed
            results = [exc] * len(batch)
        self._count(len(batch))
        for waiting, result in zip(batch, results, strict=True):
            if waiting.future.done():
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)

    def _count(self, size: int) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.steps += size
        if size > 1:
            stats.batched_steps += size
        stats.largest_batch = max(stats.largest_batch, size)
