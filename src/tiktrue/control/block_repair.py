"""The admin mends damaged blocks: a node's heartbeat names its blocks whose files fail
verification (``block_faults``, found by the node's block guard); the admin tells people
(event log and webhook: ``block_corrupt``, then ``block_repaired``) and pushes those blocks
again with the distributor's verified push, the same path as any other block transfer.

The admin's own files are the network's source: when one of them is damaged the admin cannot
push it to itself, so the event says how to mend it (download the model again from the
repository or import it again); the node picks the good file up by itself. One repair per
node at a time; a failed one is tried again after a pause that doubles, up to five minutes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiktrue.control.distributor import push_blocks
from tiktrue.model.store import BlockStore
from tiktrue.protocol.network_config import config_path, read_config

log = logging.getLogger("tiktrue.repair")

FIRST_RETRY_S = 5.0
MOST_RETRY_S = 300.0
SETTLE_S = 6.0  # after a push: time for the node's guard to see the new file (3 polls)


def corrupt_event(network_id: str, node_id: str, faults: dict, serving) -> tuple[str, dict]:
    """The event (name, fields) of a node whose block files fail verification."""
    how = (
        "it still serves its verified copy in memory"
        if serving
        else "its span does not serve until they are repaired"
    )
    listed = ", ".join(f"{name} ({why})" for name, why in sorted(faults.items()))
    return "block_corrupt", {
        "level": "error",
        "network_id": network_id,
        "node_id": node_id,
        "blocks": dict(faults),
        "serving": bool(serving),
        "message": f"node {node_id}: block files fail verification: {listed}; {how}",
    }


def repaired_event(network_id: str, node_id: str) -> tuple[str, dict]:
    return "block_repaired", {
        "level": "info",
        "network_id": network_id,
        "node_id": node_id,
        "message": f"node {node_id}: every block file verifies again",
    }


class BlockRepairs:
    """The admin's repairs, fed by every heartbeat answer (``on_beat``)."""

    def __init__(self, data_dir: Path, admin_id: str, event: Callable[..., Any]) -> None:
        self.data_dir = Path(data_dir)
        self.admin_id = admin_id
        self.event = event  # EventLog.log_system_events
        self._reported: dict[tuple[str, str], dict[str, str]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._not_before: dict[tuple[str, str], float] = {}
        self._pause: dict[tuple[str, str], float] = {}

    def on_beat(self, network_id: str, node_id: str, stats: dict) -> None:
        """A heartbeat answer (a ``HealthMonitor`` beat listener)."""
        faults = stats.get("block_faults") or {}
        key = (network_id, node_id)
        if not isinstance(faults, dict):
            return
        tell = node_id != self.admin_id  # the admin's own node logs its own events
        if not faults:
            if self._reported.pop(key, None) is not None:
                self._pause.pop(key, None)
                if tell:
                    name, fields = repaired_event(network_id, node_id)
                    self.event(name, **fields)
            return
        if self._reported.get(key) != faults:
            self._reported[key] = dict(faults)
            if tell:
                name, fields = corrupt_event(network_id, node_id, faults, stats.get("loaded"))
                self.event(name, **fields)
        running = self._tasks.get(key)
        if (running is None or running.done()) and time.monotonic() >= self._not_before.get(
            key, 0.0
        ):
            self._tasks[key] = asyncio.get_running_loop().create_task(
                self._repair(network_id, node_id, sorted(faults))
            )

    async def _repair(self, network_id: str, node_id: str, blocks: list[str]) -> None:
        key = (network_id, node_id)
        try:
            problem = await self._push(network_id, node_id, blocks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the node away, a refused chunk, ...: try again later
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            log.info("network %s: pushed %s to %s again", network_id, blocks, node_id)
            self._not_before[key] = time.monotonic() + SETTLE_S
            return
        pause = self._pause[key] = min(self._pause.get(key, FIRST_RETRY_S / 2) * 2, MOST_RETRY_S)
        self._not_before[key] = time.monotonic() + pause
        log.warning("network %s: cannot repair %s on %s: %s", network_id, blocks, node_id, problem)
        self.event(
            "block_repair_failed",
            level="error",
            network_id=network_id,
            node_id=node_id,
            blocks=blocks,
            message=problem,
            retry_in_s=pause,
        )

    async def _push(self, network_id: str, node_id: str, blocks: list[str]) -> str | None:
        """Push ``blocks`` to the node again; None when done, else why it cannot be."""
        config = read_config(config_path(self.data_dir, network_id))
        store = BlockStore(self.data_dir / "models" / config.model_id)
        source = {name: await asyncio.to_thread(store.check_block, name) for name in blocks}
        damaged = {name: why for name, why in source.items() if why is not None}
        if damaged:
            return (
                f"the admin's own copy of {', '.join(sorted(damaged))} of {config.model_id} "
                f"is damaged ({'; '.join(damaged.values())}): download the model again "
                f"(tiktrue models download {config.model_id} --from URL) or import it again; "
                "the nodes take the good files up by themselves"
            )
        if node_id == self.admin_id:
            return None  # its own files verify again: its guard is about to see it
        await push_blocks(self.data_dir, network_id, store, config.node(node_id), blocks)
        return None

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
