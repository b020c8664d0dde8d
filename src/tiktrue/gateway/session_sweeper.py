"""Freeing on the nodes the sessions nobody uses: those idle for ``idle_timeout_s`` (their
history stays in the store; a later turn rebuilds them), and, after a restart of this gateway,
those the nodes may still hold from before it."""

from __future__ import annotations

import asyncio
import logging
import time

from tiktrue.gateway.session_registry import SessionRegistry

log = logging.getLogger("tiktrue.gateway")

IDLE_TIMEOUT_S = 30 * 60.0  # a session idle this long is freed on the nodes (history kept)
LEFT_OVER_BATCH = 32  # sessions left from before a restart, closed together


class SessionSweeper:
    """Background frees of one network's sessions (``sessions``: the gateway's registry)."""

    def __init__(self, sessions: SessionRegistry, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.sessions = sessions
        self.idle_timeout_s = idle_timeout_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """On the running loop: free what the nodes may hold from the last run, then sweep
        idle sessions."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def free_idle(self, idle_s: float | None = None) -> list[str]:
        """Close on every node the sessions unused for ``idle_s`` (default: the gateway's idle
        timeout); their history stays in the store and a later turn rebuilds them."""
        limit = self.idle_timeout_s if idle_s is None else idle_s
        sessions = self.sessions
        freed = []
        for session_id, state in sessions.items():
            if state.lock.locked() or time.monotonic() - state.last_used < limit:
                continue
            async with state.lock:  # a turn that comes meanwhile waits, then loads it again
                if sessions.get(session_id) is not state:
                    continue
                if time.monotonic() - state.last_used < limit:
                    continue
                await sessions.close_on_nodes(session_id)
                sessions.forget(session_id)
                await sessions.write(
                    sessions.store.set_live, sessions.network_id, [session_id], False
                )
            freed.append(session_id)
        if freed:
            log.info("network %s: freed %d idle session(s)", sessions.network_id, len(freed))
        return freed

    async def free_left_over(self) -> list[str]:
        """After a restart: the nodes may still hold sessions this gateway had (its own node's
        KV is gone, so they will be replayed anyway): close them there. Each is claimed while
        its close is in flight (a turn for it waits, then loads it afresh); one in memory is
        in use again and left alone."""
        sessions = self.sessions
        left = await asyncio.to_thread(sessions.store.live_sessions, sessions.network_id)
        freed: list[str] = []
        for start in range(0, len(left), LEFT_OVER_BATCH):
            claimed = await sessions.claim(left[start : start + LEFT_OVER_BATCH])
            try:
                await asyncio.gather(*(sessions.close_on_nodes(s, anywhere=True) for s in claimed))
                await asyncio.to_thread(
                    sessions.store.set_live, sessions.network_id, list(claimed), False
                )
            finally:
                sessions.unclaim(claimed)
            freed += claimed
        return freed

    async def _sweep_forever(self) -> None:
        network_id = self.sessions.network_id
        try:
            await self.free_left_over()
        except Exception:
            log.exception("network %s: cannot free the sessions of the last run", network_id)
        interval = min(60.0, max(0.05, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.free_idle()
            except Exception:
                log.exception("network %s: the idle sweep failed", network_id)
