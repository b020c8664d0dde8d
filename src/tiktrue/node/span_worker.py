"""``SpanWorker``: the one thread that computes a node's span (as vLLM's worker owns its model).

The thread owns the span's ``BlockEngine`` (its weights and KV cache), the batching of steps
and, where the span ends with the head, the sampling. The event loop that serves the node's
links, heartbeats, control channel and UI hands it immutable ``Step`` values
(``submit(step) -> Future[StepResult]``) and session control (``call``), and never runs torch
itself: a step of ten seconds on a big model delays no heartbeat.

Continuous batching: the decode steps (one new position each) of every session queued when a
round starts run as one batched forward; other work (a prompt's chunk, session control) runs
alone, one job between two batches, so a long prompt delays the other sessions' tokens by one
chunk at a time, never by the whole prompt. A round never waits for steps that are not here
yet: along a chain, sessions reach a node in groups (the pipeline's stages at work), and a
round that waited for the others made every node wait on the others' waits (1.5 s per token
on a 3-node chain, measured by ``bench/concurrency.py``).

Priority classes (``limits.PRIORITIES``: quick, normal, deep) order the work under load
(``_take_round``): of the prompt chunks queued, the highest class goes first (the earliest
within a class), and a chunk of a higher class than every decode step queued goes before
their batch; a batch of a higher class goes before the chunks. Every decode step queued
joins the batch whatever its class: a batch of eight costs about 2.4 single steps (SmolLM2,
int4, ``bench/quant_paths.py``), so holding some back would cost them a round of their own
and speed the others by little. A step passed over ages: every
``AGE_ROUNDS`` rounds it waits while it could have run count as one class higher, so a deep
request is delayed, never starved. Session control runs in the order it came, between
rounds: the steps queued after it wait for it (a chain switch frees every session before the
new chain's first step runs). A class changes the order of rounds, never what a round
computes: a session's tokens are the same in any class.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tiktrue import limits
from tiktrue.model.engine import BlockEngine
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.session_control import SpanSessions


@dataclass(frozen=True)
class Step:
    """One forward step of one session through this span, as the chain hop received it."""

    session_id: str
    start: int  # the first position it runs
    inputs: torch.Tensor  # token ids [n] (a span with embed) or hidden states [1, n, hidden]
    tokens: tuple[int, ...] = ()  # the ids it runs: the head's history (repetition penalty)
    sampling: SamplingParams | None = None  # new settings for the session's sampler
    sample: bool = True  # False: a prompt chunk before the last (the head samples nothing)
    opens: bool = False  # the session's first step: open it afresh on this node first
    priority: int = limits.PRIORITY_RANK[limits.DEFAULT_PRIORITY]  # its class's rank

    @property
    def positions(self) -> int:
        shape = self.inputs.shape
        return int(shape[-2] if self.inputs.dim() == 3 else shape[-1] if shape else 0)


@dataclass(frozen=True)
class StepResult:
    """A step's outcome: the hidden states for the next node, or the head's token."""

    hidden: torch.Tensor | None
    token: int | None
    compute_ms: float


@dataclass
class WorkerStats:
    steps: int = 0  # steps run
    batched_steps: int = 0  # of which in a batch of two or more
    rounds: int = 0  # engine calls
    largest_batch: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# A step passed over this many rounds (while it could have run) counts one class higher: a
# deep step waits at most about 2 * AGE_ROUNDS rounds more than a quick one queued with it.
AGE_ROUNDS = 4


@dataclass(eq=False)  # jobs are compared by identity (a step holds a tensor)
class _Job:
    future: Future
    step: Step | None = None  # a step, or ...
    call: Callable[[], Any] | None = None  # ... session control
    passed: int = 0  # rounds that ran other work while this step could have run

    @property
    def batchable(self) -> bool:
        return self.step is not None and self.step.positions == 1 and not self.step.opens

    @property
    def rank(self) -> int:
        """Its class's rank, less one for every ``AGE_ROUNDS`` rounds it was passed over."""
        return self.step.priority - self.passed // AGE_ROUNDS


class SpanWorker:
    """Computes ``engine``'s span on a thread of its own; see the module's docstring."""

    def __init__(
        self, engine: BlockEngine, sessions: SpanSessions, *, name: str, delay_s: float = 0.0
    ) -> None:
        """``delay_s``: every round first keeps this thread busy that long, holding the GIL
        as Python code does (a deliberately slow span, for tests and chaos runs)."""
        self.engine = engine
        self.sessions = sessions
        self.delay_s = delay_s
        self.stats = WorkerStats()
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._held = 0
        self._closed = False
        self._alone_turn = False  # the last round was a batch: a job that is not goes next
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    # --- the event loop's side ---------------------------------------------------------------

    def submit(self, step: Step) -> Future:
        """The step's ``StepResult``, or its error, once a round has run it."""
        return self._put(_Job(Future(), step=step))

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` on the worker's thread between two rounds (session control)."""
        return self._put(_Job(Future(), call=function))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No round starts meanwhile: what is submitted inside runs as the next round."""
        with self._ready:
            self._held += 1
        try:
            yield
        finally:
            with self._ready:
                self._held -= 1
                self._ready.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stop: queued jobs fail (cancelled); a round running ends first (blocks up to
        ``timeout``: call it off the event loop)."""
        with self._ready:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._ready.notify()
        for job in queued:
            job.future.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _put(self, job: _Job) -> Future:
        with self._ready:
            if self._closed:
                job.future.set_exception(RuntimeError("the span worker has stopped"))
                return job.future
            self._queue.append(job)
            self._ready.notify()
        return job.future

    # --- the worker's thread -----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._closed and (self._held or not self._queue):
                    self._ready.wait()
                if self._closed:
                    return
                round_ = self._take_round()
            if round_[0].step is None:
                self._settle(round_[0].future, round_[0].call)
            else:
                self._run_steps(round_)

    def _take_round(self) -> list[_Job]:
        """The next round (see the module's docstring): session control first in line; else,
        of the steps queued before any session control (one per session: a session's next
        step waits for its last), every decode step as one batch or the prompt chunk of the
        highest class, whichever ranks higher (alternating on a tie)."""
        if self._queue[0].step is None:
            return [self._queue.popleft()]
        batch: list[_Job] = []
        chunks: list[_Job] = []
        sessions: set[str] = set()
        for job in self._queue:
            if job.step is None:
                break  # session control: what came after it waits for it
            if job.step.session_id not in sessions:
                sessions.add(job.step.session_id)
                (batch if job.batchable else chunks).append(job)
        alone = min(chunks, key=lambda job: job.rank, default=None)  # the earliest of a rank
        best = min((job.rank for job in batch), default=None)
        if alone is not None and (
            best is None or alone.rank < best or (alone.rank == best and self._alone_turn)
        ):
            chosen, self._alone_turn = [alone], False
        else:
            chosen, self._alone_turn = batch, True
        for job in chosen:
            self._queue.remove(job)
        taken = {id(job) for job in chosen}
        for job in batch + chunks:  # the others were passed over: they age
            if id(job) not in taken:
                job.passed += 1
        return chosen

    def queued(self) -> dict[str, int]:
        """Steps waiting now, by class (for ``/metrics``)."""
        counts = dict.fromkeys(limits.PRIORITIES, 0)
        with self._ready:
            for job in self._queue:
                if job.step is not None:
                    counts[limits.PRIORITIES[job.step.priority]] += 1
        return counts

    @staticmethod
    def _settle(future: Future, function: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function())
        except BaseException as exc:  # handed to the waiting caller
            future.set_exception(exc)

    def _run_steps(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        results = self._compute([job.step for job in live])
        self._count(len(live))
        for job, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _compute(self, steps: list[Step]) -> list[StepResult | BaseException]:
        """The span's forward of each step (several decode steps as one batch), then each
        one's sampled token (head) or hidden states. One result or error per step."""
        results: list[StepResult | BaseException | None] = [None] * len(steps)
        for i, step in enumerate(steps):
            if step.opens:
                try:
                    self.sessions.open(step.session_id)
                except Exception as exc:
                    results[i] = exc
        runs = [i for i, r in enumerate(results) if r is None]
        began = time.perf_counter()
        while time.perf_counter() - began < self.delay_s:
            pass  # the slow span of a test: busy, as a long forward keeps this thread
        try:
            if len(runs) == 1:
                step = steps[runs[0]]
                outputs = [self.engine.forward(step.session_id, step.inputs, step.start)]
            else:
                outputs = self.engine.forward_batch(
                    [(steps[i].session_id, steps[i].inputs, steps[i].start) for i in runs]
                )
        except Exception as exc:  # the engine itself failed: every step of the round fails
            outputs = [exc] * len(runs)
        compute_ms = round((time.perf_counter() - began) * 1000, 3)
        for i, out in zip(runs, outputs, strict=True):
            try:
                results[i] = out if isinstance(out, Exception) else self._finish(steps[i], out)
            except Exception as exc:  # this step's sampling failed: its error only
                results[i] = exc
            if isinstance(results[i], StepResult):
                results[i] = StepResult(results[i].hidden, results[i].token, compute_ms)
        return results

    def _finish(self, step: Step, out: torch.Tensor) -> StepResult:
        if not self.engine.span.has_head:
            return StepResult(out, None, 0.0)
        sampler = self.sessions.sampler(step.session_id)
        if step.sampling is not None:
            sampler.set_params(step.sampling)
        if not step.sample:
            sampler.history.extend(step.tokens)
            return StepResult(None, None, 0.0)
        return StepResult(None, sampler.next_token(out[0], list(step.tokens)), 0.0)

    def _count(self, size: int) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.steps += size
        if size > 1:
            stats.batched_steps += size
        stats.largest_batch = max(stats.largest_batch, size)
