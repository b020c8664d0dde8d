"""``StepScheduler``: the order in which one worker runs the forward steps of all sessions.

Continuous batching: the decode steps (one new position each) of every session ready at the
same moment run as one batched forward on the engine thread; steps that arrive meanwhile wait
for the next round. Other work (a prompt's chunk, session control) runs alone, one job after
each batch, so a long prompt delays the other sessions' tokens by one chunk at a time, never
by the whole prompt.

The per-token path: a step's arrival starts a round on the next turn of the event loop (so
the steps that arrived in the same turn join it) and the round runs; no task per round. A
lone session is not slowed: a round starts as soon as the engine is free.

A round never waits for sessions that are not here yet. Sessions drift apart (their prompts
end at different times) and a node then sees them in groups, one round each; along a chain
those groups are the pipeline's stages at work, each node busy with a different group. A
round that waited for the sessions of earlier rounds was tried: on a chain every node then
waited for sessions held up by the others' waits, up to its cap per node per token (1.5 s per
token on a 3-node chain, measured by ``bench/concurrency.py``), and a lone session paid for
sessions that had ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class _Waiting:
    key: str  # the session, for a step; None for other work
    job: Any  # a step (for run_batch), or a callable
    future: asyncio.Future


@dataclass
class SchedulerStats:
    steps: int = 0  # steps run
    batched_steps: int = 0  # of which in a batch of two or more
    rounds: int = 0  # engine calls
    largest_batch: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepScheduler:
    """Runs steps with ``run_batch(steps) -> results`` (one result or exception per step)
    on ``executor``: every batchable step queued when a round starts together, alternating
    with one job that is not."""

    def __init__(
        self,
        executor: Executor,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        inline_batches: bool = False,
    ) -> None:
        self._executor = executor
        self.inline_batches = inline_batches
        self._run_batch = run_batch
        self._batchable: list[_Waiting] = []
        self._alone: list[_Waiting] = []
        self._busy = False  # a round is scheduled, waiting for stragglers, or running
        self._alone_turn = False  # the last round was a batch: a job that is not goes next
        self._closed = False
        self.stats = SchedulerStats()

    async def run(self, key: str, step: Any, *, batchable: bool) -> Any:
        """The result of ``step`` (of session ``key``), or its exception raised."""
        loop = asyncio.get_running_loop()
        if batchable:
            waiting = _Waiting(key, step, loop.create_future())
            self._batchable.append(waiting)
        else:
            waiting = _Waiting(key, lambda: self._run_batch([step])[0], loop.create_future())
            self._alone.append(waiting)
        self._wake(loop)
        return await waiting.future

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the engine thread between two rounds (never during one)."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(None, function, loop.create_future())
        self._alone.append(waiting)
        self._wake(loop)
        return await waiting.future

    def close(self) -> None:
        """Stop: every job still queued fails (cancelled); a round running ends unanswered."""
        self._closed = True
        for waiting in [*self._batchable, *self._alone]:
            waiting.future.cancel()
        self._batchable, self._alone = [], []

    # --- rounds ----------------------------------------------------------------------------

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._busy:
            self._busy = True
            loop.call_soon(self._next_round, loop)  # the next turn: this turn's steps join

    def _next_round(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed or not (self._batchable or self._alone):
            self._busy = False
            return
        if self._alone and (self._alone_turn or not self._batchable):
            self._alone_turn = False
            self._submit(loop, [self._alone.pop(0)], batch=False)
            return
        batch, self._batchable = self._batchable, []
        self._alone_turn = True
        self._submit(loop, batch, batch=True)

    def _submit(self, loop, round_: list[_Waiting], *, batch: bool) -> None:
        if batch and self.inline_batches:
            try:
                results = self._run_batch([w.job for w in round_])
            except Exception as exc:
                results = [exc] * len(round_)
            self._finish(loop, round_, results, batch)
            return
        try:
            self._executor.submit(self._compute, loop, round_, batch)
        except RuntimeError as exc:  # the executor is shut down
            self._finish(loop, round_, [exc] * len(round_), batch)

    def _compute(self, loop, round_: list[_Waiting], batch: bool) -> None:
        """Engine thread: run the round, hand every result back in one callback."""
        try:
            results = self._run_batch([w.job for w in round_]) if batch else [round_[0].job()]
        except Exception as exc:  # run_batch itself failed: every step of the round fails
            results = [exc] * len(round_)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._finish, loop, round_, results, batch)

    def _finish(self, loop, round_: list[_Waiting], results: list, batch: bool) -> None:
        if round_[0].key is not None:  # steps, not other work
            self._count(len(round_))
        for waiting, result in zip(round_, results, strict=True):
            if waiting.future.done():
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)
        if self.inline_batches:  # the steps just answered send on before the next round
            loop.call_soon(self._next_round, loop)
        else:
            self._next_round(loop)

    def _count(self, size: int) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.steps += size
        if size > 1:
            stats.batched_steps += size
        stats.largest_batch = max(stats.largest_batch, size)
