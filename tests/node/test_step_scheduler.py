"""The worker's step scheduler: steps ready together run as one batch, prompt chunks one per
round, and each step gets its own result or error."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tiktrue.node.step_scheduler import StepScheduler


def run_rounds(jobs):
    """Run jobs (key, value, batchable) all submitted in one turn of the loop; the calls
    of run_batch and each job's result."""
    calls: list[list] = []

    def run_batch(values):
        calls.append(list(values))
        return [ValueError(v) if v == "bad" else v.upper() for v in values]

    async def go():
        scheduler = StepScheduler(ThreadPoolExecutor(1), run_batch)
        tasks = [scheduler.run(k, v, batchable=b) for k, v, b in jobs]
        return await asyncio.gather(*tasks, return_exceptions=True), scheduler.stats

    results, stats = asyncio.run(go())
    return calls, results, stats


def test_steps_ready_together_run_as_one_batch_and_chunks_alone():
    calls, results, stats = run_rounds(
        [
            ("a", "a1", True),
            ("p", "chunk1", False),
            ("b", "b1", True),
            ("q", "chunk2", False),
            ("c", "bad", True),
        ]
    )
    # round 1: every decode step, then one chunk; round 2: the other chunk
    assert calls == [["a1", "b1", "bad"], ["chunk1"], ["chunk2"]]
    assert results[:4] == ["A1", "CHUNK1", "B1", "CHUNK2"]
    assert isinstance(results[4], ValueError)  # its own error; the batch's others went on
    assert (stats.steps, stats.batched_steps, stats.rounds, stats.largest_batch) == (5, 3, 3, 3)


def test_a_round_never_waits_for_sessions_of_earlier_rounds():
    """a and b ran together; a's next step comes, b's a few turns of the loop later (b is at
    another node of the chain, or its answer ended): a's round starts at once, alone, instead
    of waiting for b to make a batch of two."""
    calls: list[list] = []

    def run_batch(values):
        calls.append(list(values))
        return values

    async def go():
        scheduler = StepScheduler(ThreadPoolExecutor(1), run_batch)
        await asyncio.gather(
            scheduler.run("a", 1, batchable=True), scheduler.run("b", 1, batchable=True)
        )

        async def late_b():
            for _ in range(5):
                await asyncio.sleep(0)
            return await scheduler.run("b", 2, batchable=True)

        assert await asyncio.gather(scheduler.run("a", 2, batchable=True), late_b()) == [2, 2]

    asyncio.run(go())
    assert calls == [[1, 1], [2], [2]]  # a round that waited for b would give [2, 2]


def test_an_engine_failure_fails_every_step_of_its_round():
    def run_batch(values):
        raise RuntimeError("engine broke")

    async def go():
        scheduler = StepScheduler(ThreadPoolExecutor(1), run_batch)
        return await asyncio.gather(
            scheduler.run("a", 1, batchable=True),
            scheduler.run("b", 1, batchable=True),
            return_exceptions=True,
        )

    results = asyncio.run(go())
    assert all(isinstance(r, RuntimeError) for r in results)
