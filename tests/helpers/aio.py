"""Running a coroutine from a plain test function."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


def run(coro):
    """``asyncio.run(coro)``; where this thread already runs a loop (Playwright's sync API
    keeps one once a browser test has run in the session), in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
