"""The admin's view of its network's health (seed ``monitor_worker_health``).

The admin beats every node of a network over the node's control channel (op ``heartbeat``, no
new port) every ``heartbeat_s``; each beat has its own timeout, well under ``dead_after_s``, so
a hung process (SIGSTOP) counts as a missed beat just like a dead one. Per node:

    unknown/online --missed beat--> suspect --no good beat for dead_after_s--> dead
    any state --good beat--> online

``suspect_now`` is for a gateway or peer whose link to a node just dropped, or whose step
stalls: the node turns suspect and is probed at once. A refused connection (nothing listens:
the process is gone) makes it dead at once. A node so reported that then gives no good beat
for ``quick_dead_s`` (three beats) is dead too: a PC whose cable was pulled, or that froze,
is found in about a second, while answers wait for it. A node that is only busy (a long step,
its cores shared) answers its beats (its event loop never runs the model) and is online again
at the next beat. Without a report from the data plane, the clock alone decides
(``dead_after_s``): an idle network fails nothing over for a slow beat or two.
Listeners (``add_listener``) hear every change; the node service writes them to the event log,
failover acts on them. Beat listeners (``add_beat_listener``) read every answer
(block repair acts on the damaged blocks a node reports). The state machine takes its clock
from the caller, so it is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol.network_config import NetworkConfig, NodeEntry
from tiktrue.security.auth_manager import IdentityError
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.health")

UNKNOWN, ONLINE, SUSPECT, DEAD = "unknown", "online", "suspect", "dead"
HISTORY = 200  # state changes kept per node
REPORT_TIMEOUT_S = 5.0  # a member telling the admin about a lost link
# on_change(network_id, node_id, old, new, info); may return an awaitable (run as a task)
Listener = Callable[[str, str, str, str, dict], Awaitable[None] | None]
# on_beat(network_id, node_id, stats): every good beat, with what the node answered
BeatListener = Callable[[str, str, dict], None]


class BeatFailed(Exception):
    """A heartbeat got no answer; ``refused``: nothing listens there (the process is gone)."""

    def __init__(self, why: str, *, refused: bool = False) -> None:
        super().__init__(why)
        self.refused = refused


# beat(node, timeout, fresh) -> (round trip ms, the node's stats); raises BeatFailed
Beat = Callable[[NodeEntry, float, bool], Awaitable[tuple[float, dict]]]


@dataclass
class NodeHealth:
    node_id: str
    state: str = UNKNOWN
    since: float = 0.0  # clock time of the last change
    watched: float = 0.0  # clock time from which a node never heard counts as quiet
    last_beat: float | None = None  # clock time of the last good beat
    last_beat_at: float | None = None  # the same, wall clock (for people)
    rtt_ms: float | None = None
    stats: dict = field(default_factory=dict)
    missed: int = 0  # beats missed in a row
    reported: str | None = None  # why the data plane suspects it (cleared by a good beat)
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class HealthMonitor:
    """One network's health, as its admin sees it."""

    def __init__(
        self,
        config: NetworkConfig,
        credentials: NetworkCredentials | None = None,
        *,
        beat: Beat | None = None,
        self_address: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.network_id = config.network_id
        self.clock, self.wall = clock, wall
        self.self_address = self_address  # the admin's own control channel, if not in config
        self._links = ControlBeats(config.network_id, credentials) if beat is None else None
        self._beat = beat or self._links.beat
        self.nodes: dict[str, NodeHealth] = {}
        self.listeners: list[Listener] = []
        self.beat_listeners: list[BeatListener] = []
        self._tasks: dict[str, asyncio.Task] = {}
        self._probes: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None
        self._verdicts_from = float("-inf")  # no node is declared dead before this clock time
        self.update_config(config)

    # --- settings ------------------------------------------------------------------------

    def update_config(self, config: NetworkConfig) -> None:
        """A new config version: nodes that joined are watched, nodes that left are dropped."""
        self.config = config
        for entry in config.nodes:
            now = self.clock()
            self.nodes.setdefault(entry.node_id, NodeHealth(entry.node_id, since=now, watched=now))
        for node_id in set(self.nodes) - {n.node_id for n in config.nodes}:
            del self.nodes[node_id]
            for tasks in (self._tasks, self._probes):
                task = tasks.pop(node_id, None)
                if task is not None:
                    task.cancel()

    @property
    def beat_timeout_s(self) -> float:
        """Each beat's own limit: a third of ``dead_after_s``, so a node misses several beats
        (and turns suspect) before it is declared dead."""
        return self.config.dead_after_s / 3

    @property
    def quick_dead_s(self) -> float:
        """How long a node the data plane reported may stay silent: three beats (a node that
        only computes still answers beats), never more than ``dead_after_s``."""
        return min(3 * self.config.heartbeat_s, self.config.dead_after_s)

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def add_beat_listener(self, listener: BeatListener) -> None:
        self.beat_listeners.append(listener)

    # --- the state machine (no I/O, clock from the caller) ---------------------------------

    def record_beat(self, node_id: str, rtt_ms: float, stats: dict) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.last_beat, node.last_beat_at = self.clock(), self.wall()
        node.rtt_ms, node.stats, node.missed = round(rtt_ms, 3), stats, 0
        node.reported = None
        if node.state != ONLINE:
            self._change(node, ONLINE, "heartbeat answered")
        for listener in list(self.beat_listeners):
            try:
                listener(self.network_id, node_id, stats)
            except Exception:
                log.exception("a beat listener failed on %s", node_id)

    def record_miss(self, node_id: str, why: str) -> None:
        """A beat got no answer: suspect (dead comes with time, see ``check``)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.missed += 1
        if node.state in (UNKNOWN, ONLINE):
            self._change(node, SUSPECT, f"missed a heartbeat: {why}")
        self.check()

    def check(self) -> None:
        """Time-driven changes: a beat overdue makes a node suspect, ``dead_after_s`` without
        one makes it dead (also while a beat to a hung node still waits for its answer)."""
        now = self.clock()
        overdue = self.config.heartbeat_s + self.beat_timeout_s
        for node in list(self.nodes.values()):
            quiet = now - (node.last_beat if node.last_beat is not None else node.watched)
            verdicts = node.state != DEAD and now >= self._verdicts_from
            if verdicts and quiet >= self.config.dead_after_s:
                self._change(node, DEAD, f"no heartbeat for {quiet:.1f} s")
            elif verdicts and node.reported is not None and quiet >= self.quick_dead_s:
                self._change(node, DEAD, f"no heartbeat for {quiet:.1f} s ({node.reported})")
            elif node.state == ONLINE and quiet >= overdue:
                self._change(node, SUSPECT, f"no heartbeat for {quiet:.1f} s")

    def hold_verdicts(self, seconds: float) -> None:
        """The admin itself was held up (its loop stalled, the PC slept): its beats could not
        go out, so no node is declared dead for ``seconds``, while fresh beats come in."""
        self._verdicts_from = max(self._verdicts_from, self.clock() + seconds)

    def suspect_now(self, node_id: str, why: str) -> None:
        """A link to the node dropped: suspect it, and ``report`` it."""
        node = self.nodes.get(node_id)
        if node is not None and node.state in (UNKNOWN, ONLINE):
            self._change(node, SUSPECT, why)
        self.report(node_id, why)

    def report(self, node_id: str, why: str) -> None:
        """The data plane may have lost the node (a step through its chain stalls): probe it
        at once (needs a running loop). A refused connection makes it dead at once; silence
        for ``quick_dead_s`` too; a good beat forgets the report (a busy node answers)."""
        node = self.nodes.get(node_id)
        if node is None or node.state == DEAD:
            return
        node.reported = node.reported or why
        running = self._probes.get(node_id)
        if running is None or running.done():
            self._probes[node_id] = asyncio.get_running_loop().create_task(self._probe(node_id))

    def _change(self, node: NodeHealth, new: str, why: str) -> None:
        old, now = node.state, self.clock()
        node.state, node.since = new, now
        info = {
            "why": why,
            "at": self.wall(),
            "last_beat_s": None if node.last_beat is None else round(now - node.last_beat, 3),
            "rtt_ms": node.rtt_ms,
        }
        node.history.append({"from": old, "to": new, **info})
        log.log(
            logging.INFO if new == ONLINE else logging.WARNING,
            "network %s: node %s %s -> %s (%s)",
            self.network_id,
            node.node_id,
            old,
            new,
            why,
        )
        for listener in list(self.listeners):
            try:
                result = listener(self.network_id, node.node_id, old, new, dict(info))
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result)
            except Exception:
                log.exception("a health listener failed on %s -> %s", old, new)

    # --- what others read ----------------------------------------------------------------

    def state(self, node_id: str) -> str:
        return self.nodes[node_id].state

    def snapshot(self, history: int = 20) -> dict:
        """The JSON-able view ``tiktrue network status`` shows (op ``health``)."""
        now = self.clock()
        return {
            "network_id": self.network_id,
            "heartbeat_s": self.config.heartbeat_s,
            "dead_after_s": self.config.dead_after_s,
            "nodes": {
                node.node_id: {
                    "state": node.state,
                    "state_for_s": round(now - node.since, 3),
                    "last_beat_s": (
                        None if node.last_beat is None else round(now - node.last_beat, 3)
                    ),
                    "last_beat_at": node.last_beat_at,
                    "rtt_ms": node.rtt_ms,
                    "missed": node.missed,
                    "stats": node.stats,
                    "history": list(node.history)[-history:] if history else [],
                }
                for node in self.nodes.values()
            },
        }

    # --- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self.monitor_worker_health())

    async def stop(self) -> None:
        tasks = [self._loop_task, *self._tasks.values(), *self._probes.values()]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        self._loop_task, self._tasks, self._probes = None, {}, {}
        if self._links is not None:
            self._links.close()

    async def monitor_worker_health(self) -> None:
        """Beat every node (one task each, so a hung node delays no other) and check the
        clocks, until cancelled."""
        for node in self.nodes.values():
            node.watched = self.clock()
        last = self.clock()
        while True:
            for node_id in self.nodes:
                task = self._tasks.get(node_id)
                if task is None or task.done():
                    self._tasks[node_id] = asyncio.create_task(self._beat_loop(node_id))
            now, pause = self.clock(), self.config.heartbeat_s / 2
            if now - last > pause + self.beat_timeout_s:  # this loop itself was held up
                self.hold_verdicts(self.config.heartbeat_s + self.beat_timeout_s)
            last = now
            self.check()
            await asyncio.sleep(pause)

    def _target(self, node_id: str) -> NodeEntry | None:
        """The node's entry, with the admin's own control address filled in if missing."""
        for entry in self.config.nodes:
            if entry.node_id == node_id:
                if entry.control_address is None and entry.role == "admin" and self.self_address:
                    port = int(self.self_address.rsplit(":", 1)[1])
                    return entry.model_copy(update={"control_port": port})
                return entry
        return None

    async def _beat_loop(self, node_id: str) -> None:
        while node_id in self.nodes:
            began = self.clock()
            entry = self._target(node_id)
            if entry is None or entry.control_address is None:
                return  # no way to reach it: stays unknown, then dead (``check``)
            try:
                rtt_ms, stats = await self._beat(entry, self.beat_timeout_s, False)
            except BeatFailed as exc:
                self.record_miss(node_id, str(exc))
            except Exception as exc:  # any other failure is a miss too: the loop must go on
                log.warning("network %s: beat to %s failed: %r", self.network_id, node_id, exc)
                self.record_miss(node_id, repr(exc))
            else:
                self.record_beat(node_id, rtt_ms, stats)
            await asyncio.sleep(max(0.0, self.config.heartbeat_s - (self.clock() - began)))

    async def _probe(self, node_id: str) -> None:
        entry = self._target(node_id)
        if entry is None or entry.control_address is None:
            return
        try:
            rtt_ms, stats = await self._beat(entry, self.beat_timeout_s, True)
        except BeatFailed as exc:
            node = self.nodes.get(node_id)
            if node is None or node.state == DEAD:
                return
            if exc.refused:
                self._change(node, DEAD, f"refused the connection: {exc}")
            else:
                self.record_miss(node_id, f"did not answer a probe: {exc}")
        else:
            self.record_beat(node_id, rtt_ms, stats)


class ControlBeats:
    """Heartbeats over each node's control channel: one kept-open link per node (a fresh one
    for probes); a link that timed out is dropped, since its answer may still come."""

    def __init__(self, network_id: str, credentials: NetworkCredentials | None) -> None:
        self.network_id = network_id
        self.credentials = credentials
        self._links: dict[str, ControlLink] = {}

    async def beat(
        self, node: NodeEntry, timeout: float, fresh: bool = False
    ) -> tuple[float, dict]:
        link = None if fresh else self._links.pop(node.node_id, None)
        if link is not None and link.address != node.control_address:
            link.abort()
            link = None
        try:
            return await asyncio.wait_for(self._beat(node, link, fresh), timeout)
        except asyncio.TimeoutError:
            raise BeatFailed(f"no answer in {timeout:.1f} s") from None

    async def _beat(self, node: NodeEntry, link: ControlLink | None, fresh: bool):
        try:
            if link is None:
                link = ControlLink.to(node, self.credentials)
                await link.__aenter__()
            began = time.perf_counter()
            try:
                reply = await link.call(
                    "heartbeat", network_id=self.network_id, sent_at=time.time()
                )
            except ControlError as exc:  # it answered, so it is alive (an older version?)
                reply = {"error": str(exc)}
            rtt_ms = (time.perf_counter() - began) * 1000
        except asyncio.CancelledError:
            if link is not None:
                link.abort()
            raise
        except PeerUnavailable as exc:
            if link is not None:
                link.abort()
            refused = isinstance(exc.__cause__, ConnectionRefusedError)
            raise BeatFailed(str(exc), refused=refused) from exc
        except (IdentityError, OSError) as exc:
            if link is not None:
                link.abort()
            raise BeatFailed(str(exc)) from exc
        if fresh:
            link.abort()
        else:
            self._links[node.node_id] = link
        stats = {k: v for k, v in reply.items() if k not in ("in_reply_to", "ok")}
        return rtt_ms, stats

    def close(self) -> None:
        for link in self._links.values():
            link.abort()
        self._links.clear()


def event_logger(events) -> Listener:
    """A listener that writes every change to the node's ``EventLog`` (and its webhook)."""

    def on_change(network_id: str, node_id: str, old: str, new: str, info: dict) -> None:
        level = "info" if new == ONLINE else "error" if new == DEAD else "warning"
        events.log_system_events(
            f"node_{new}",
            level=level,
            network_id=network_id,
            node_id=node_id,
            previous=old,
            **info,
        )

    return on_change


async def report_suspect(data_dir, network_id: str, node_id: str, why: str) -> bool:
    """Tell the network's admin that a link to ``node_id`` dropped (op ``health_suspect``);
    best effort: ``False`` when the admin cannot be told."""
    from tiktrue.protocol.network_config import config_path, read_config

    try:
        config = read_config(config_path(data_dir, network_id))
        credentials = NetworkCredentials.load(data_dir, network_id)
        admin = next(n for n in config.nodes if n.role == "admin")

        async def tell() -> None:
            async with ControlLink.to(admin, credentials) as link:
                await link.call("health_suspect", network_id=network_id, node_id=node_id, why=why)

        await asyncio.wait_for(tell(), REPORT_TIMEOUT_S)
    except Exception as exc:  # the admin away too: its own beats will find the node
        log.warning("network %s: cannot report node %s to the admin: %s", network_id, node_id, exc)
        return False
    return True
