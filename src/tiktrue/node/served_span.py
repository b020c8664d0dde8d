"""``ServedSpan``: the blocks a node serves for one network, loaded, verified and watched.

The span's block files are verified (sha256) as they load and watched while served
(``node.block_guard``: a changed file at once, a full re-hash every few hours). A span whose
files fail verification still has a server: every step gets ``fault()`` (``corrupt_block``),
the node and its other networks keep running, and the admin pushes the damaged blocks again.
A loaded span has its engine and the span worker that computes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from tiktrue import limits
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.errors import CorruptBlock
from tiktrue.model.store import BlockStore
from tiktrue.node.block_guard import BlockGuard
from tiktrue.node.session_control import SpanSessions
from tiktrue.node.span_worker import SpanWorker
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.node_tls import block_keyring

log = logging.getLogger("tiktrue.node")
# A deliberately slow span (tests and chaos runs): every round of the span worker first stays
# busy this many seconds.
SLOW_STEP_ENV = "TIKTRUE_CHAOS_STEP_DELAY_S"


class ServedSpan:
    """One node's span of one network: engine, worker, block guard."""

    def __init__(
        self,
        data_dir: Path,
        config: NetworkConfig,
        node_id: str,
        kv_budget_bytes: int,
        on_change: Callable[[dict[str, str]], None],
    ) -> None:
        """``on_change(faults)``: the set of damaged blocks changed (on the event loop)."""
        self.node_id = node_id
        self.network_id = config.network_id
        self.on_change = on_change
        data_dir = Path(data_dir)
        store = BlockStore(data_dir / "models" / config.model_id, keyring=block_keyring(data_dir))
        spill_dir = data_dir / "cache" / "kv" / self.network_id
        for stale in spill_dir.glob("*.npz"):  # KV spilled by a run that did not end cleanly
            stale.unlink(missing_ok=True)
        self.span = Span(tuple(config.node(node_id).blocks))
        # the guard notes the files before they are read: a change during the load is seen
        self.guard = BlockGuard(store, self.span.blocks, self._guard_report)
        self._load_faults: dict[str, str] = {}
        self.engine: BlockEngine | None = None
        self.worker: SpanWorker | None = None
        try:
            self.engine = BlockEngine(
                store, self.span, kv_budget_bytes=kv_budget_bytes, spill_dir=spill_dir
            )
        except CorruptBlock as exc:  # the server still runs: it answers every step with it
            self._load_faults = {name: exc.detail for name in exc.blocks}
            log.error("network %s: span %s cannot load: %s", self.network_id, self.span, exc)
        else:
            sessions = SpanSessions(self.engine, data_dir / "sessions" / self.network_id)
            self.worker = SpanWorker(
                self.engine,
                sessions,
                name=f"span-{self.network_id}-{self.span}",
                delay_s=float(os.environ.get(SLOW_STEP_ENV) or 0),
            )
        hidden_size = self.engine.hidden_size if self.engine else store.config().hidden_size
        # the largest legitimate frame: the hidden states of the largest step, plus its header
        self.max_frame_bytes = (
            limits.MAX_STEP_TOKENS * hidden_size * 4 + limits.MAX_FRAME_HEADER_BYTES
        )

    @property
    def block_faults(self) -> dict[str, str]:
        """The span's blocks whose files fail verification now, and why."""
        return dict(self.guard.faults)

    def fault(self, network_id: str) -> CorruptBlock:
        """What every request gets while the span could not load (``engine`` is None)."""
        names = sorted(self.guard.faults or self._load_faults)
        return CorruptBlock(
            names,
            f"node {self.node_id} cannot serve {self.span} of network {network_id}: "
            "its block files failed verification; it serves again once they are repaired",
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.guard.start(self._load_faults)
        if self._load_faults:
            self._changed(self._load_faults)

    def stop(self) -> None:
        """Blocks (the guard's thread and the worker end): call it off the event loop."""
        self.guard.stop()
        if self.worker is not None:
            self.worker.close()
        if self.engine is not None:
            self.engine.kv.clear()
        self.engine = self.worker = None  # release the span's weights now

    def _guard_report(self, faults: dict[str, str]) -> None:
        """The guard's thread: the set of damaged blocks changed."""
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to tell
            self._loop.call_soon_threadsafe(self._changed, faults)

    def _changed(self, faults: dict[str, str]) -> None:
        if faults:
            how = "still serving its verified copy" if self.engine else "not serving"
            log.error("network %s: damaged block files (%s): %s", self.network_id, how, faults)
        else:
            log.warning("network %s: the files of %s verify again", self.network_id, self.span)
        self.on_change(faults)

    def health_stats(self) -> dict:
        """Steps, sessions, KV pages, and the blocks whose files fail verification (the
        admin pushes them again). Counts only: safe beside the worker's thread."""
        stats = {
            "steps": self.worker.stats.as_dict() if self.worker else {},
            "queued": self.worker.queued() if self.worker else {},  # steps waiting, by class
            "block_faults": self.block_faults,
            "loaded": self.engine is not None,  # False: the span could not load its blocks
        }
        if self.engine is not None:
            kv = self.engine.kv.stats()
            stats["sessions"] = kv.sessions_resident + kv.sessions_spilled
            stats["kv_pages_used"] = kv.pages_total - kv.pages_free
            stats["kv_pages_total"] = kv.pages_total
        return stats
