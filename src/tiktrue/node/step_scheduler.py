"""``StepScheduler``: the order in which one worker runs the forward steps of all sessions.

Continuous batching: the decode steps (one new position each) of every session ready at the
same moment run as one batched forward on the engine thread; steps that arrive meanwhile wait
for the next round. Other work (a prompt's chunk, session control) runs alone, one job after
each batch, so a long prompt delays the other sessions' tokens by one chunk at a time, never
by the whole prompt.

The per-token path: a step's arrival starts a round on the next turn of the event loop (so
the steps that arrived in the same turn join it) and the round runs; no task per round. A
lone session is not slowed: a round starts as soon as the engine is free.

Sessions drift apart (their prompts end at different times), and a node then sees them in
groups, one round each, every group paying the whole cost of reading the weights. So when
sessions of the last two rounds are missing, a round waits for them: at least ``gather_s``,
at most one period of a session (the time between two of its steps here, the chain's round
trip), bounded by ``GATHER_CAP_S``. The groups then merge into one batch for good, for the
price of one wait; an arrival of the last one missing ends the wait at once. A session whose
answer has ended costs its neighbours one such wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

GATHER_S = 0.002  # the least a round waits for missing sessions of the last rounds
GATHER_CAP_S = 0.5  # the most


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
        gather_s: float = GATHER_S,
        inline_batches: bool = False,
    ) -> None:
        self._executor = executor
        self.inline_batches = inline_batches
        self._run_batch = run_batch
        self.gather_s = gather_s
        self._batchable: list[_Waiting] = []
        self._alone: list[_Waiting] = []
        self._busy = False  # a round is scheduled, waiting for stragglers, or running
        self._alone_turn = False  # the last round was a batch: a job that is not goes next
        self._recent: list[set[str]] = []  # sessions of the last two batch rounds
        self._seen: dict[str, float] = {}  # when each session of the recent rounds last came
        self._period = 0.0  # time between two steps of a session (moving average)
        self._timer: asyncio.TimerHandle | None = None  # waiting for the last round's sessions
        self._deadline: float | None = None
        self._closed = False
        self.stats = SchedulerStats()

    async def run(self, key: str, step: Any, *, batchable: bool) -> Any:
        """The result of ``step`` (of session ``key``), or its exception raised."""
        loop = asyncio.get_running_loop()
        if batchable:
            waiting = _Waiting(key, step, loop.create_future())
            self._batchable.append(waiting)
            now, last = loop.time(), self._seen.get(key)
            if last is not None:
                self._period += 0.25 * (now - last - self._period)
            self._seen[key] = now
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
        if self._timer is not None:
            self._timer.cancel()
        for waiting in [*self._batchable, *self._alone]:
            waiting.future.cancel()
        self._batchable, self._alone = [], []

    # --- rounds ----------------------------------------------------------------------------

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._busy:
            self._busy = True
            loop.call_soon(self._next_round, loop)  # the next turn: this turn's steps join
        elif self._timer is not None and not self._missing():
            self._timer.cancel()
            self._timer = None
            loop.call_soon(self._next_round, loop)

    def _missing(self) -> set[str]:
        expected = set().union(*self._recent)
        return expected - {w.key for w in self._batchable}

    def _next_round(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._closed or not (self._batchable or self._alone):
            self._busy = False
            return
        if self._alone and (self._alone_turn or not self._batchable):
            self._alone_turn = False
            self._submit(loop, [self._alone.pop(0)], batch=False)
            return
        if self._missing() and not self._alone:
            now = loop.time()
            if self._deadline is None:
                self._deadline = now + min(max(self._period, self.gather_s), GATHER_CAP_S)
            if now < self._deadline:  # wait for the stragglers (an arrival ends it early)
                self._timer = loop.call_at(self._deadline, self._next_round, loop)
                return
        self._deadline = None
        batch, self._batchable = self._batchable, []
        self._alone_turn = True
        self._recent = [*self._recent[-1:], {w.key for w in batch}]
        recent = set().union(*self._recent)
        self._seen = {k: t for k, t in self._seen.items() if k in recent}
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
