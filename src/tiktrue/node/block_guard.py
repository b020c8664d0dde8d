"""Watches the block files a span was loaded from, so a damaged file is found and repaired.

A span runs from private copies of its blocks, verified when they were read (see
``model.store``): a file changed afterwards never reaches a token. The disk copy still matters:
the span loads it again on every restart or new config, and it is what this node would hand
on. So the guard tells the node as soon as a block's file stops matching the manifest (the
admin then pushes it again) and when it matches again (a span that could not load restarts).

Two checks, on one thread of its own (off the event loop and off the engine's thread, at the
lowest CPU priority the OS gives a thread), so they never slow a step:

- every ``poll_s``: a ``stat`` of each file (size, mtime, ctime, inode: microseconds). A
  change, a vanished file or a new one (a repair) is re-hashed at once;
- every ``recheck_s``: every file re-hashed at most ``rate`` bytes per second, for what a
  ``stat`` does not show (a write that put the old mtime back, bit rot on the disk).

Both hash with the store's one verification (``BlockStore.check_block``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable

from tiktrue.model.store import BlockStore

log = logging.getLogger("tiktrue.node")

POLL_S = 2.0
RECHECK_S = 6 * 3600.0
RATE = 32 << 20  # bytes per second of a background re-check (sha256: ~3% of a core here)


class _Stopped(Exception):
    """The guard was stopped in the middle of a paced re-hash."""


class BlockGuard:
    """Reports ``on_change(faults)`` (from its own thread) whenever the set of the span's
    blocks whose files fail verification changes; ``faults`` maps block -> what is wrong."""

    def __init__(
        self,
        store: BlockStore,
        blocks: Iterable[str],
        on_change: Callable[[dict[str, str]], None],
        *,
        poll_s: float = POLL_S,
        recheck_s: float = RECHECK_S,
        rate: int = RATE,
    ) -> None:
        self.store = store
        self.blocks = list(blocks)
        self.on_change = on_change
        self.poll_s, self.recheck_s, self.rate = poll_s, recheck_s, rate
        self.faults: dict[str, str] = {}
        self._seen = {name: self._signature(name) for name in self.blocks}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _signature(self, name: str) -> tuple | None:
        path = self.store.block_file(name)
        try:
            st = path.stat()
        except OSError:
            return None
        return (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def start(self, faults: dict[str, str] | None = None) -> None:
        """Watch from now on. ``faults``: what the load found wrong (the span did not load);
        then every block is checked at once, so all the bad ones are repaired together.
        Without it the files are as the load verified them (signatures taken before)."""
        if faults:
            self.faults = dict(faults)
        self._thread = threading.Thread(
            target=self._run, args=(bool(faults),), name="block-guard", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self, check_all: bool) -> None:
        _lower_priority()
        next_recheck = time.monotonic() + self.recheck_s
        if check_all:
            self._check(self.blocks)
        while not self._stop.wait(self.poll_s):
            try:
                seen = self._seen
                changed = [name for name in self.blocks if self._signature(name) != seen[name]]
                if changed:
                    self._check(changed)
                if time.monotonic() >= next_recheck:
                    self._check(self.blocks, paced=True)
                    next_recheck = time.monotonic() + self.recheck_s
            except _Stopped:
                return
            except Exception:  # a bug here must not end the watch
                log.exception("block guard check failed")

    def _check(self, names: list[str], *, paced: bool = False) -> None:
        """Re-hash ``names``; report when the set of faults changes."""
        faults = dict(self.faults)
        for name in names:
            signature = self._signature(name)
            problem = self.store.check_block(name, pace=self._pace() if paced else None)
            self._seen[name] = signature
            if problem is None:
                faults.pop(name, None)
            else:
                faults[name] = problem
        if faults != self.faults:
            self.faults = faults
            self.on_change(dict(faults))

    def _pace(self) -> Callable[[int], None]:
        """Sleeps after each piece so the re-hash stays under ``rate`` bytes per second."""
        began, done = time.monotonic(), 0

        def pace(n: int) -> None:
            nonlocal done
            done += n
            ahead = done / self.rate - (time.monotonic() - began)
            if ahead > 0 and self._stop.wait(ahead):
                raise _Stopped

        return pace


def _lower_priority() -> None:
    """This thread only, where the OS allows it (Linux threads have their own nice value);
    elsewhere the pacing alone bounds the re-hash."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
