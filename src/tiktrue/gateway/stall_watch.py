"""When a step of the chain counts as stalled: a silent node is reported within a fraction of
a second (so the admin probes the chain's nodes at once), while the answer goes on waiting for
it. A false alarm costs a probe: a busy node answers its heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

STALL_S = 5.0  # a step still unanswered after this long makes the admin check the chain ...
STALL_FLOOR_S = 0.5  # ... a decode step, after this long or STALL_FACTOR of its usual time
STALL_FACTOR = 20

T = TypeVar("T")


class StallWatch:
    """Knows the usual decode round trip; ``on_stall(error)`` hears a step that took much
    longer (once per step)."""

    def __init__(self, on_stall: Callable[[Exception], None], stall_s: float = STALL_S) -> None:
        self.on_stall = on_stall
        self.stall_s = stall_s
        self._decode_ms: float | None = None  # the usual decode round trip (a moving average)

    def record(self, tokens: int, round_trip_ms: float) -> None:
        """A step of ``tokens`` tokens came back after ``round_trip_ms``."""
        if tokens == 1:
            last = self._decode_ms if self._decode_ms is not None else round_trip_ms
            self._decode_ms = 0.9 * last + 0.1 * round_trip_ms

    def stall_after(self, tokens: int) -> float:
        """A decode step stalls after ``STALL_FACTOR`` times the usual decode round trip (at
        least ``STALL_FLOOR_S``); a prompt's steps after ``stall_s``."""
        if tokens > 1 or self._decode_ms is None:
            return self.stall_s
        return min(self.stall_s, max(STALL_FLOOR_S, STALL_FACTOR * self._decode_ms / 1000))

    async def watched(self, step: Awaitable[T], tokens: int) -> T:
        """Await ``step`` (of ``tokens`` tokens); when it takes longer than its stall time,
        report the chain once. (A timer, not a task per step: this runs for every token.)"""
        stall_s = self.stall_after(tokens)
        error = TimeoutError(f"a step waited {stall_s:.1f} s for the chain")
        timer = asyncio.get_running_loop().call_later(stall_s, self.on_stall, error)
        try:
            return await step
        finally:
            timer.cancel()
