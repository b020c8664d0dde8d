"""``failover_manager``: what the admin of a network does when a node of its chain is lost.

Three answers, tried in this order (seed 000, phase 8):

- ``activate_backup_worker``: a backup node already holds a replica of a run of consecutive
  spans that includes the lost node's span, with its block server running; it takes that
  run over at once. No block moves, only a new config: the nodes it covers stand by as
  backups (they keep their blocks), and the node before it links to it.
- ``redistribute_blocks``: without such a backup, the planner places the chain again over
  the nodes still alive, within their caps; the admin pushes the blocks they lack from its
  own store and switches to the new config.
- ``graceful_degradation``: when the rest cannot hold the model, the network is degraded:
  answers in flight wait and new requests queue (the gateway says so) until a node returns.

Either way the gateway replays each session's token history through the new chain, so an
answer in flight pauses and goes on with no token lost or repeated (``ChainClient``).
When a lost node returns, the network is planned again with it (backups included).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue.control.config_writer import ConfigWriter
from tiktrue.control.health_monitor import DEAD, ONLINE, HealthMonitor
from tiktrue.control.network_admin import load
from tiktrue.control.planner import PlanError
from tiktrue.control.plans import apply_network
from tiktrue.node.control_link import ControlLink
from tiktrue.protocol.network_config import NetworkConfig

log = logging.getLogger("tiktrue.failover")


def activate_backup_worker(config: NetworkConfig, lost: set[str]) -> NetworkConfig | None:
    """The config in which a backup takes over the span of a lost node, or None when no
    backup covers it. A backup's replica must be exactly the spans of consecutive chain
    nodes (none of them the admin); those nodes become backups of their own spans. (Its
    version is the network's writer's to number: see ``TakeOver``.)"""
    chain = config.chain()
    lost_in_chain = [n for n in chain if n.node_id in lost]
    if not lost_in_chain:
        return None
    for backup in config.backups():
        if backup.node_id in lost:
            continue
        covered = config.replica_of(backup)
        if covered is None:
            continue
        if not all(n.node_id in {c.node_id for c in covered} for n in lost_in_chain):
            continue
        standing_by = {n.node_id for n in covered}
        nodes = [
            n.model_copy(update={"role": "worker"})
            if n.node_id == backup.node_id
            else n.model_copy(update={"role": "backup"})
            if n.node_id in standing_by
            else n
            for n in config.nodes
        ]
        return NetworkConfig.model_validate(
            {**config.model_dump(), "nodes": [n.model_dump() for n in nodes]}
        )
    return None


@dataclass(frozen=True)
class TakeOver:
    """A backup takes over the spans of the ``lost`` nodes, in the config as the network's
    writer finds it (None: no backup covers them there)."""

    lost: frozenset[str]

    def apply(self, current: NetworkConfig) -> NetworkConfig | None:
        return activate_backup_worker(current, set(self.lost))

    def describe(self) -> str:
        return f"a backup takes over from {', '.join(sorted(self.lost))}"


async def redistribute_blocks(
    data_dir: Path, network_id: str, lost: set[str], writer: ConfigWriter
) -> NetworkConfig:
    """Plan the chain over the nodes still alive, push the blocks they lack, switch.
    Raises ``PlanError`` (saying what is missing) when the rest cannot hold the model."""

    def planned(plan) -> None:
        log.info("network %s: redistributing without %s\n%s", network_id, lost, plan.describe())

    return await apply_network(data_dir, network_id, writer=writer, lost=lost, planned=planned)


RETRY_BACK_S = 5.0  # a node whose re-plan failed is tried again at a beat after this long


@dataclass
class FailoverState:
    """What the failover manager knows of one network."""

    lost: set[str] = field(default_factory=set)
    degraded: str | None = None  # why the network cannot serve, while it cannot
    failed_over: bool = False  # the plan changed because of a loss: re-plan on return


class FailoverManager:
    """Runs on the admin node. ``node_lost`` comes from the health monitor (a node dead) and
    from a gateway whose chain failed; ``answered`` from every good beat of a node (``watch``
    wires both to a monitor). Its new configs go through the network's one ``writer``, with
    every other change of the network: none makes the same version as another, or undoes
    it; ``event`` records what happened. One failover decision per network at a time.

    Returning is level-triggered: a lost node that answers a beat is planned back in, whenever
    it answers, not only on the beat that turned it online. A node may answer again while its
    own failover still waits or runs (a busy PC that missed its verdict by a fraction of a
    second); the edge has passed by the time the failover marks it lost, and it must not stay
    out of the chain for that.
    """

    def __init__(
        self,
        data_dir: Path,
        writer: ConfigWriter,
        *,
        event: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.writer = writer
        self.event = event or (lambda *a, **k: None)
        self.networks: dict[str, FailoverState] = {}
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # a decision at a time
        self.clock = clock
        self._returns: dict[tuple[str, str], asyncio.Task] = {}  # planning a node back in
        self._retry_at: dict[tuple[str, str], float] = {}  # after a failed re-plan
        self._tasks: set[asyncio.Task] = set()

    def state(self, network_id: str) -> FailoverState:
        return self.networks.setdefault(network_id, FailoverState())

    def watch(self, monitor: HealthMonitor) -> None:
        """Act on ``monitor``'s verdicts: a dead node is taken over (unless it answered again
        before its failover began), a lost node that answers is planned back in."""

        def on_change(network_id: str, node_id: str, old: str, new: str, info: dict) -> None:
            if new != DEAD:
                return

            def still_dead() -> bool:
                node = monitor.nodes.get(node_id)
                return node is None or node.state != ONLINE

            self._in_background(self._lose(network_id, node_id, info.get("why", ""), still_dead))

        def on_beat(network_id: str, node_id: str, stats: dict) -> None:
            self.answered(network_id, node_id)

        monitor.add_listener(on_change)
        monitor.add_beat_listener(on_beat)

    async def _lose(self, network_id: str, node_id: str, why: str, still_lost) -> None:
        try:
            done = await self.node_lost(network_id, node_id, why, still_lost=still_lost)
            log.warning("network %s: node %s is dead: %s", network_id, node_id, done)
        except Exception:
            log.exception("network %s: failover for %s failed", network_id, node_id)

    def answered(self, network_id: str, node_id: str) -> None:
        """``node_id`` answered a beat: when it is lost, plan it back in (one attempt at a time;
        after a failed one, again at a beat ``RETRY_BACK_S`` later). Needs a running loop."""
        key = (network_id, node_id)
        if node_id not in self.state(network_id).lost:
            return
        running = self._returns.get(key)
        if running is not None and not running.done():
            return
        if self.clock() < self._retry_at.get(key, float("-inf")):
            return
        self._returns[key] = self._in_background(self._return(network_id, node_id))

    async def _return(self, network_id: str, node_id: str) -> None:
        key = (network_id, node_id)
        try:
            done = await self.node_back(network_id, node_id)
        except Exception as exc:  # a push refused, a node away: the node stays lost, retried
            self._retry_at[key] = self.clock() + RETRY_BACK_S
            log.warning(
                "network %s: planning node %s back in failed (tried again in %.0f s): %r",
                network_id,
                node_id,
                RETRY_BACK_S,
                exc,
            )
            return
        self._retry_at.pop(key, None)
        log.warning("network %s: node %s is back: %s", network_id, node_id, done)

    def _in_background(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def node_lost(
        self,
        network_id: str,
        node_id: str,
        why: str = "",
        *,
        still_lost: Callable[[], bool] | None = None,
    ) -> str:
        """A node is lost: take its span over. Returns what was done (for the event log).
        ``still_lost`` is asked once the network's lock is held: a node that answered again
        meanwhile (it was only slow) is not taken over."""
        async with self.locks[network_id]:
            if still_lost is not None and not still_lost():
                return "it answered again before its failover began: nothing to take over"
            state = self.state(network_id)
            state.lost.add(node_id)
            config, _ = load(self.data_dir, network_id)
            if not any(n.node_id in state.lost for n in config.chain()):
                return "not in the chain: nothing to take over"
            lost = frozenset(state.lost)
            new = await self.writer.commit(network_id, TakeOver(lost), skip=set(lost))
            if new is not None:
                done = f"backup took over (config v{new.version})"
            else:
                try:
                    new = await redistribute_blocks(
                        self.data_dir, network_id, set(lost), self.writer
                    )
                    done = f"blocks redistributed (config v{new.version})"
                except PlanError as exc:
                    state.degraded = str(exc)
                    self.event(
                        "network_degraded",
                        level="error",
                        network_id=network_id,
                        node_id=node_id,
                        reason=str(exc),
                    )
                    return f"degraded: {exc}"
            state.degraded = None
            state.failed_over = True
            self.event(
                "failover", level="warning", network_id=network_id, node_id=node_id, done=done
            )
            return done

    async def node_back(self, network_id: str, node_id: str) -> str:
        """A lost node answers again: plan the network with it (its blocks are mostly there), so
        the backups are back in place (also with a manual plan: the failover changed it). It
        stays lost until the new config is in place: raises what stopped that (a push refused,
        a node away), and ``answered`` tries again."""
        async with self.locks[network_id]:
            state = self.state(network_id)
            if node_id not in state.lost:
                return "nothing to do"
            others = state.lost - {node_id}
            if not (state.failed_over or state.degraded):
                state.lost.discard(node_id)
                return "nothing to do"
            try:
                new = await apply_network(
                    self.data_dir, network_id, writer=self.writer, lost=others
                )
            except PlanError as exc:  # back, but the network still cannot hold the model
                state.lost.discard(node_id)
                state.degraded = str(exc)
                return f"still degraded: {exc}"
            state.lost.discard(node_id)
            state.degraded = None
            state.failed_over = bool(state.lost)
            self.event(
                "network_restored", network_id=network_id, node_id=node_id, version=new.version
            )
            return f"re-planned with {node_id} (config v{new.version})"


async def find_lost(
    config: NetworkConfig, credentials, *, timeout: float = 3.0, only: set[str] | None = None
) -> set[str]:
    """The nodes holding blocks (chain and backups; ``only`` these, when given) that do not
    answer a control ping within ``timeout`` seconds: a dead process refuses at once, a
    hung one times out."""

    async def answers(node) -> bool:
        async def ping() -> None:
            async with ControlLink.to(node, credentials) as link:
                await link.call("ping")

        try:
            await asyncio.wait_for(ping(), timeout)
        except Exception:  # refused, timed out, closed, not who it should be: lost
            return False
        return True

    nodes = [
        n
        for n in config.nodes
        if n.control_address and (n.node_id in only if only is not None else n.blocks)
    ]
    alive = await asyncio.gather(*(answers(n) for n in nodes))
    return {n.node_id for n, ok in zip(nodes, alive, strict=True) if not ok}
