"""The span worker, without sockets: the thread that owns a span's engine batches the decode
steps queued together, runs prompt chunks and session control between batches, samples at
the head, and gives each step its own result or error."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tiktrue import limits
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.errors import PositionError
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.session_control import SpanSessions
from tiktrue.node.span_worker import AGE_ROUNDS, SpanWorker, Step, StepResult

GREEDY = SamplingParams(temperature=0)
PROMPTS = {"a": [5, 17, 42, 99, 7], "b": [250, 31], "c": [64, 12, 3, 77, 8, 1, 2, 3]}


class RecordingEngine(BlockEngine):
    """The real engine, noting which sessions each call ran (one list per engine call)."""

    calls: list[list[str]]

    def forward(self, session_id, inputs, start, **kwargs):
        self.calls.append([session_id])
        return super().forward(session_id, inputs, start, **kwargs)

    def forward_batch(self, steps):
        self.calls.append([session_id for session_id, _, _ in steps])
        return super().forward_batch(steps)


@pytest.fixture
def worker(tiny_llama, tmp_path):
    order = tiny_llama.manifest.model_chain_order
    engine = RecordingEngine(tiny_llama, Span(tuple(order)))
    engine.calls = []
    worker = SpanWorker(engine, SpanSessions(engine, tmp_path), name="test-span")
    yield worker
    worker.close()


def prompt_step(session_id: str) -> Step:
    ids = PROMPTS[session_id]
    return Step(session_id, 0, torch.tensor(ids), tuple(ids), GREEDY, opens=True)


def decode_step(session_id: str, token: int, position: int) -> Step:
    return Step(session_id, position, torch.tensor([token]), (token,))


def result(future) -> StepResult:
    return future.result(timeout=120)


def reference(tiny_llama, session_id: str, steps: int) -> list[int]:
    """Greedy tokens of the same engine called directly, one session alone."""
    engine = BlockEngine(tiny_llama, Span(tuple(tiny_llama.manifest.model_chain_order)))
    engine.open_session("ref")
    ids = PROMPTS[session_id]
    tokens = [int(engine.forward("ref", torch.tensor(ids), 0).argmax())]
    for i in range(steps):
        logits = engine.forward("ref", torch.tensor(tokens[-1:]), len(ids) + i)
        tokens.append(int(logits.argmax()))
    return tokens


def test_steps_queued_together_run_as_one_batch_and_chunks_alone(worker, tiny_llama):
    first = {s: result(worker.submit(prompt_step(s))).token for s in ("a", "b")}
    worker.engine.calls.clear()
    with worker.held():  # everything below is queued before the next round starts
        decodes = {s: worker.submit(decode_step(s, first[s], len(PROMPTS[s]))) for s in "ab"}
        chunk = worker.submit(prompt_step("c"))
        again = worker.submit(decode_step("a", 0, len(PROMPTS["a"]) + 1))  # a's next: waits
        wrong = worker.submit(decode_step("b", 0, 99))  # a wrong position: its error only
    tokens = {s: [first[s], result(f).token] for s, f in decodes.items()}
    result(chunk)
    result(again)
    with pytest.raises(PositionError):
        result(wrong)
    # round 1: both decode steps; then the prompt alone; then a's second step with b's
    # wrong one (refused before its forward)
    assert worker.engine.calls[:3] == [["a", "b"], ["c"], ["a", "b"]]
    assert worker.stats.rounds == 5 and worker.stats.largest_batch == 2
    for s in "ab":
        assert tokens[s] == reference(tiny_llama, s, 1)


def test_a_round_never_waits_for_sessions_of_earlier_rounds(worker):
    first = {s: result(worker.submit(prompt_step(s))).token for s in ("a", "b")}
    worker.engine.calls.clear()
    with worker.held():
        together = [worker.submit(decode_step(s, first[s], len(PROMPTS[s]))) for s in "ab"]
    second_a = result(together[0]).token
    result(together[1])
    # a's next step comes while b's does not: it runs at once, alone
    result(worker.submit(decode_step("a", second_a, len(PROMPTS["a"]) + 1)))
    assert worker.engine.calls == [["a", "b"], ["a"]]


def test_the_head_samples_each_session_with_its_own_settings(worker):
    sampled = SamplingParams(temperature=0.9, seed=7)
    steps = [
        Step("g", 0, torch.tensor(PROMPTS["a"]), tuple(PROMPTS["a"]), GREEDY, opens=True),
        Step("s", 0, torch.tensor(PROMPTS["a"]), tuple(PROMPTS["a"]), sampled, opens=True),
    ]
    tokens = [result(worker.submit(step)).token for step in steps]
    again = result(
        worker.submit(
            Step("s2", 0, torch.tensor(PROMPTS["a"]), tuple(PROMPTS["a"]), sampled, opens=True)
        )
    ).token
    assert again == tokens[1]  # the same seed, the same token
    assert worker.sessions.sampler("g").history == PROMPTS["a"]


def test_a_prompt_chunk_before_the_last_samples_nothing(worker):
    ids = PROMPTS["c"]
    head, tail = ids[:5], ids[5:]
    out = result(
        worker.submit(Step("p", 0, torch.tensor(head), tuple(head), GREEDY, False, opens=True))
    )
    assert out.token is None and out.hidden is None
    out = result(worker.submit(Step("p", 5, torch.tensor(tail), tuple(tail))))
    assert isinstance(out.token, int)
    assert worker.sessions.sampler("p").history == ids


def test_session_control_runs_on_the_workers_thread_between_rounds(worker):
    seen = []

    def control():
        seen.append(threading.current_thread().name)
        worker.sessions.open("x")
        return worker.engine.kv.has("x")

    assert worker.call(control).result(timeout=60) is True
    assert seen == ["test-span"]
    worker.call(lambda: worker.sessions.close("x")).result(timeout=60)
    assert not worker.engine.kv.has("x")


def test_after_close_every_queued_and_new_job_fails_cleanly(worker):
    with worker.held():
        queued = worker.submit(prompt_step("a"))
        worker.close()
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit(prompt_step("b")).result(timeout=10)


# --- priority classes (limits.PRIORITIES): the order of rounds, never the tokens ------------

RANK = limits.PRIORITY_RANK


def classed_prompt(session_id: str, priority: str) -> Step:
    ids = PROMPTS[session_id[0]]
    return Step(
        session_id, 0, torch.tensor(ids), tuple(ids), GREEDY, opens=True, priority=RANK[priority]
    )


def test_prompt_chunks_go_by_class_then_in_order_and_control_keeps_its_place(worker):
    with worker.held():  # all queued before the first round
        jobs = [
            worker.submit(classed_prompt("a-deep", "deep")),
            worker.submit(classed_prompt("b-normal", "normal")),
            worker.submit(classed_prompt("c-quick", "quick")),
            worker.submit(classed_prompt("a-quick", "quick")),
        ]
        control = worker.call(lambda: None)
        late = worker.submit(classed_prompt("c-late", "quick"))  # queued after the control
    for job in [*jobs, control, late]:
        job.result(timeout=120)
    # the quick ones in the order they came, then normal, then deep; the control then runs,
    # and only then the quick chunk queued after it
    assert worker.engine.calls == [["c-quick"], ["a-quick"], ["b-normal"], ["a-deep"], ["c-late"]]


def test_under_a_decode_load_quick_goes_first_and_deep_waits_its_age(worker, tiny_llama):
    first = {s: result(worker.submit(prompt_step(s))).token for s in "ab"}
    worker.engine.calls.clear()
    decoded = {s: [first[s]] for s in "ab"}
    rounds_of_load = 7

    def decode(session_id: str) -> None:
        """The session's next decode step; when it is done, the one after (submitted from
        the worker's thread before its next round: a load that never leaves a gap)."""
        tokens = decoded[session_id]
        future = worker.submit(
            decode_step(session_id, tokens[-1], len(PROMPTS[session_id]) + len(tokens) - 1)
        )

        def done(f) -> None:
            tokens.append(f.result().token)
            if len(tokens) <= rounds_of_load:
                decode(session_id)

        future.add_done_callback(done)

    with worker.held():
        for s in "ab":
            decode(s)  # normal
        deep = worker.submit(classed_prompt("c-deep", "deep"))
        quick = worker.submit(classed_prompt("a-quick", "quick"))
    assert result(quick).token == reference(tiny_llama, "a", 0)[0]
    assert result(deep).token == reference(tiny_llama, "c", 0)[0]
    wait_for(lambda: all(len(decoded[s]) > rounds_of_load for s in "ab"))
    batch = ["a", "b"]
    # the quick chunk before the batch queued with it; the deep one passed over until it has
    # waited AGE_ROUNDS rounds (then one class up: a tie with the batch, which alternates)
    waited = [["a-quick"], *[batch] * (AGE_ROUNDS - 1)]
    assert worker.engine.calls[: AGE_ROUNDS + 2] == [*waited, ["c-deep"], batch]
    for s in "ab":  # the load's tokens are its tokens alone
        assert decoded[s] == reference(tiny_llama, s, rounds_of_load)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the worker did not finish its rounds"
        time.sleep(0.01)
