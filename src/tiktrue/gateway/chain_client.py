"""``ChainClient``: the gateway's one client of a network's chain.

A step goes to the chain's first node (in this process when that node is here, else over a
mutual-TLS link), travels node to node, and the head's token comes back. The client knows of
each session one thing: the tokens it has fed the chain (``history``) and whether the current
chain's nodes hold them (``on_chain``). A session that is not on the chain — new, or the chain
changed under it (a node lost, a new config), or a step failed on the way — is (re)opened on
every node by its next step, which first replays its history: the answer pauses, and no token
is lost or repeated. (Petals rebuilds a replaced server's cache the same way.)

Every round trip has a deadline. A step that fails because a node is unreachable reports the
broken chain (``on_broken``: the admin's failover takes it from there) and waits for a new
chain (``switch``) or tries the same one again every ``retry_s`` (the node may come back), up to
``heal_ceiling``. A step unanswered for much longer than usual (``StallWatch``) is reported
too, so the admin probes the chain's nodes at once, and goes on waiting: a new chain fails it
(the old links close) and it is replayed there.

Each step's header names the session's priority class (when it is not the default): every
node's span worker orders its queue by it. An idle backup holding a replica of a run of the
chain's spans makes a second chain (a replica chain, ``NetworkConfig.replica_chains``): a new
conversation goes to the less busy chain, the main one on a tie, and keeps to it; its steps and
control messages name their ``route``. When a replica chain fails, its sessions are replayed on
the main chain at once (the main chain is whole: nothing to report); when a config takes the
backup into the main chain (a failover), the replica chain is gone and its sessions are
replayed there too.

Three classes, in one file so that a reader follows a token's gateway side in one place (the
per-token path, docs/data_plane.md): ``ChainTransport`` (the way to the chain's first node:
in-process or over its link), ``StallWatch`` (when a step counts as stalled) and
``ChainClient`` (step, replay, heal, and what it knows of each session). Missed closes sent
again are ``chain_closes``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from tiktrue import limits
from tiktrue.gateway.chain_closes import CLOSE_TIMEOUT_S, ChainCloses
from tiktrue.gateway.errors import ChainError
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.peer_link import PeerLink, PeerUnavailable, new_message_id
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.gateway")

RECOVERABLE = {"peer_unavailable", "unknown_session"}
RETRY_S = 2.0  # while the chain is broken, try it again this often (a node may come back)
HEAL_CEILING_S = 600.0  # an answer waits this long for the network to heal, then fails
REPLICA_RETRY_S = 60.0  # a replica chain that failed takes no new conversation this long
STALL_S = 5.0  # a step still unanswered after this long makes the admin check the chain ...
STALL_FLOOR_S = 0.5  # ... a decode step, after this long or STALL_FACTOR of its usual time
STALL_FACTOR = 20

T = TypeVar("T")

_ITS_OWN = object()  # _control: along the session's own chain


def _raise_if_error(reply: dict) -> dict:
    """``reply`` itself, unless it is a node's error message: then that error, raised."""
    if reply.get("header", {}).get("message_type") == "error":
        raise ChainError(reply.get("code", "error"), reply.get("message", ""))
    return reply


@dataclass
class StepTiming:
    """One step seen from the gateway: the round trip, and each node's own timings."""

    round_trip_ms: float
    nodes: list[dict]  # in chain order: node, span, compute_ms, total_ms, link_rtt_ms
    entry_rtt_ms: float | None = None  # ping round trip of the gateway's link to the first node

    @property
    def hops(self) -> int:
        """Network hops of the step: node to node, the head's answer back to the first node,
        and to and from the first node when the gateway is not in its process."""
        between = len(self.nodes) if len(self.nodes) > 1 else 0
        return between + (0 if self.entry_rtt_ms == 0.0 else 2)

    def transit_ms(self) -> float:
        """The step's time between nodes (network, TLS, framing, queues), all hops together:
        the round trip less each node's own time."""
        return self.round_trip_ms - sum(n["total_ms"] for n in self.nodes)

    def link_rtt_ms(self) -> list[float | None]:
        """Ping round trip of each link the step used: the gateway's link to the first node
        (0 in-process), then each node's link to the next (the head's, back to the first)."""
        return [self.entry_rtt_ms, *(n.get("link_rtt_ms") for n in self.nodes)]


class ChainTransport:
    """The way to one config's chain. ``local_server()`` returns this process's block server
    of the network, or None; when it is the chain's first node, messages are handed to it."""

    def __init__(
        self,
        config: NetworkConfig,
        credentials: NetworkCredentials,
        local_server: Callable[[], object] | None = None,
    ) -> None:
        self.credentials = credentials
        self.local_server = local_server or (lambda: None)
        self.use(config)

    def use(self, config: NetworkConfig) -> None:
        """Later messages go to ``config``'s chain (the caller closes the old ``link``)."""
        entry = config.chain()[0]
        self.network_id = config.network_id
        self.entry_node_id = entry.node_id
        self.replicas = config.replica_chains()
        self.link = PeerLink(
            entry.host,
            entry.port,
            network_id=config.network_id,
            credentials=self.credentials,
            role=self.credentials.info.role,
            expected_node_id=entry.node_id,
            revoked=config.revoked_ids,
        )

    async def step(self, meta: dict, token_ids: list[int]) -> tuple[dict, StepTiming]:
        """One step (``meta``: its header) through the chain: the head's reply and the
        step's timings."""
        ids = torch.tensor(token_ids, dtype=torch.long)
        began = time.perf_counter()
        server = self._local_entry()
        if server is not None:  # in this process: the step as it is, no frame to encode
            reply = await server.hop.step(meta, ids)
            entry_rtt = 0.0
        else:
            frame = encode_tensor_frame(ids, **meta)
            reply = await self.link.request(
                frame, meta["message_id"], timeout=limits.STEP_DEADLINE_S
            )
            entry_rtt = self.link.latency_ms
        _raise_if_error(reply)
        round_trip_ms = (time.perf_counter() - began) * 1000
        return reply, StepTiming(round_trip_ms, reply.get("timings", []), entry_rtt)

    async def control(self, message: ps.Message) -> dict:
        """A session control message along the chain (its ``route`` names the chain)."""
        server = self._local_entry()
        if server is not None:
            reply = await server.answer_text(ps.make_message(message))
        else:
            reply = await self.link.request(
                message, message.message_id, timeout=limits.CONTROL_DEADLINE_S
            )
        return _raise_if_error(reply)

    def _local_entry(self):
        server = self.local_server()
        if server is not None and server.node_id == self.entry_node_id and server.engine:
            return server
        return None


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


@dataclass
class ChainSession:
    """What the client knows of a session: the tokens it fed the chain, and whether the
    current chain's nodes hold exactly those."""

    history: list[int] = field(default_factory=list)
    on_chain: bool = False  # False: its next step opens it on every node and replays history
    sampling: SamplingParams | None = None  # the settings its head's sampler was last given
    priority: str = limits.DEFAULT_PRIORITY  # its class, named in every step's header
    route: tuple[str, ...] | None = None  # the replica chain it runs on (None: the chain)


class ChainClient:
    """The network's chain as the gateway uses it (see the module's docstring).

    ``local_server()`` returns this process's block server of the network, or None: when it
    is the chain's first node, steps are handed to it in-process, without a TLS hop to itself.
    """

    def __init__(
        self,
        config: NetworkConfig,
        credentials: NetworkCredentials,
        local_server: Callable[[], object] | None = None,
        *,
        on_broken: Callable[[Exception], None] | None = None,
        prefill_chunk: int = limits.PREFILL_CHUNK_TOKENS,
        retry_s: float = RETRY_S,
        stall_s: float = STALL_S,
        heal_ceiling: float = HEAL_CEILING_S,
    ) -> None:
        self.transport = ChainTransport(config, credentials, local_server)
        self.on_broken = on_broken or (lambda error: None)
        self.prefill_chunk = prefill_chunk
        self.retry_s, self.heal_ceiling = retry_s, heal_ceiling
        self.stalls = StallWatch(lambda error: self.on_broken(error), stall_s)
        self.sessions: dict[str, ChainSession] = {}
        self.replays = 0
        self.healthy = True  # False from a failed step until a step or a probe gets through
        self.last_step: StepTiming | None = None
        self._switched = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._replica_failed: dict[tuple, float] = {}  # a replica chain -> when it failed
        self.closes = ChainCloses(
            self._control, self.sessions.__contains__, lambda: self.transport.replicas
        )

    def switch(self, config: NetworkConfig) -> None:
        """A new chain: later steps go there, every session is replayed there on its next
        step; steps still waiting on the old chain fail (its link closes) and are replayed."""
        old = self.transport.link
        self.transport.use(config)
        for session in self.sessions.values():
            session.on_chain = False
            if session.route not in self.transport.replicas:  # gone (its backup took a span)
                session.route = None
        self._in_background(old.close())
        self._switched.set()
        self._switched = asyncio.Event()
        self.closes.retry()

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        await self.closes.aclose()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.transport.link.close()

    # --- sessions ------------------------------------------------------------------------------

    async def open(self, session_id: str, busy: Collection[str] = ()) -> None:
        """A new session: its first step opens it on every node (no round trip of its own).
        It runs on the less busy chain (``busy``: the sessions answering now), the main one
        on a tie."""
        self.sessions[session_id] = ChainSession(route=self._less_busy(busy))

    def _less_busy(self, busy: Collection[str]) -> tuple[str, ...] | None:
        now = time.monotonic()
        routes = [None] + [
            r
            for r in self.transport.replicas
            if now - self._replica_failed.get(r, -1e9) > REPLICA_RETRY_S
        ]
        if len(routes) == 1:
            return None
        load = dict.fromkeys(routes, 0)
        for session_id in busy:
            session = self.sessions.get(session_id)
            if session is not None and session.route in load:
                load[session.route] += 1
        return min(routes, key=load.__getitem__)  # the first of the least busy: main on a tie

    def prioritize(self, session_id: str, priority: str) -> None:
        """The session's class from now on (``limits.PRIORITIES``)."""
        self.sessions.setdefault(session_id, ChainSession()).priority = priority

    def adopt(self, session_id: str, history: list[int], *, stale: bool) -> None:
        """Take over a session whose history comes from elsewhere (the gateway's store after a
        restart, a restored save); ``stale`` when the nodes do not hold it (it is replayed on
        the main chain), else it stays on the chain that holds it."""
        held = self.sessions.get(session_id)
        route = held.route if held is not None and not stale else None
        self.sessions[session_id] = ChainSession(list(history), on_chain=not stale, route=route)

    async def close(self, session_id: str, route: tuple[str, ...] | None = None) -> None:
        """Free the session on every node of its chain (also when it is not on it: nodes of
        the current chain that were in an old one may still hold it). A close the chain misses
        is sent again once it heals, so no node keeps a session nobody will free."""
        held = self.sessions.pop(session_id, None)
        await self.closes.close(session_id, held.route if held is not None else route)

    async def close_anywhere(self, session_id: str) -> None:
        """Free a session whose chain is not known (left from before a restart): on the
        main chain and on every replica chain."""
        await self.close(session_id)
        for route in self.transport.replicas:
            await self.close(session_id, route)

    async def truncate(self, session_id: str, length: int) -> None:
        """Rewind a session to its first ``length`` tokens on every node (KV caches and the
        head's history). A session the nodes do not hold now is only cut here: its replay
        rebuilds the shorter history. A rewind that fails on the way leaves the session off
        the chain, so it is rebuilt by replay, never continued from a half-rewound chain."""
        session = self.sessions.setdefault(session_id, ChainSession())
        del session.history[length:]
        if not session.on_chain:
            return
        try:
            await self._control(ps.SessionTruncate, session_id, length=length)
        except (ChainError, PeerUnavailable) as exc:
            log.info("session %s: rewind to %d failed (%s); replayed next", session_id, length, exc)
            session.on_chain = False

    async def control(self, kind: type[ps.Message], session_id: str, **fields) -> dict:
        """A session control message through the session's chain (save, restore, ...). A
        session the nodes should hold but do not (the chain changed) is rebuilt there first.
        A restore tries the main chain, then each replica chain (where it was saved)."""
        if kind is ps.SessionRestore:
            return await self._restore(session_id, **fields)
        session = self.sessions.get(session_id)
        if session is not None and not session.on_chain:
            await self.rebuild(session_id, len(session.history))
        return await self._control(kind, session_id, **fields)

    async def _restore(self, session_id: str, **fields) -> dict:
        routes = [None, *self.transport.replicas]
        for i, route in enumerate(routes):
            try:
                reply = await self._control(ps.SessionRestore, session_id, route=route, **fields)
            except (ChainError, PeerUnavailable) as exc:
                if getattr(exc, "code", None) != ps.SESSION_NOT_FOUND or i == len(routes) - 1:
                    raise
                # saved on another chain: the nodes before the one without it restored it
                with contextlib.suppress(ChainError, PeerUnavailable, asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._control(ps.SessionClose, session_id, route=route), CLOSE_TIMEOUT_S
                    )
                continue
            self.sessions.setdefault(session_id, ChainSession()).route = route
            return reply
        raise AssertionError("unreachable")

    async def rebuild(self, session_id: str, upto: int) -> None:
        """Put a session on the current chain now (before a save), not at its next step."""
        session = self.sessions.setdefault(session_id, ChainSession())
        if not session.on_chain:
            await self._replay(session_id, session, upto)

    async def probe(self, timeout: float = 2.0) -> bool:
        """Whether the whole chain answers now (a session close travels every node and
        computes nothing); sets ``healthy``."""
        try:
            await asyncio.wait_for(
                self._control(ps.SessionClose, f"probe-{uuid.uuid4().hex}"), timeout
            )
        except (PeerUnavailable, ChainError, asyncio.TimeoutError):
            return False
        self.healthy = True
        return True

    # --- steps ---------------------------------------------------------------------------------

    async def step(
        self,
        session_id: str,
        token_ids: list[int],
        start: int,
        sampling: SamplingParams | None = None,
    ) -> int:
        """Run ``token_ids`` (positions ``start..``) through the chain; the token the head
        samples after them. A session off the chain is replayed first; a chain that breaks
        meanwhile is waited for (see the module's docstring)."""
        session = self.sessions.setdefault(session_id, ChainSession())
        if sampling is not None:
            session.sampling = sampling
        began = time.monotonic()
        while True:
            try:
                opens = not session.on_chain
                if opens and start > 0:
                    await self._replay(session_id, session, start)
                    opens = False
                token = await self.stalls.watched(
                    self._run(session_id, session, token_ids, start, sampling, opens=opens),
                    len(token_ids),
                )
            except (PeerUnavailable, ChainError) as exc:
                code = getattr(exc, "code", "peer_unavailable")
                if code not in RECOVERABLE or time.monotonic() - began > self.heal_ceiling:
                    raise
                session.on_chain = False
                if session.route is not None:  # a replica chain failed: the main one takes it
                    log.info(
                        "session %s: replica chain %s failed (%s)", session_id, session.route, exc
                    )
                    self._replica_failed[session.route] = time.monotonic()
                    session.route = None
                    continue
                await self._wait_for_heal(exc)
                continue
            self.healthy = True
            self.closes.retry()  # the chain answers again: free what it missed meanwhile
            del session.history[start:]  # a no-op unless the session was rewound
            session.history.extend(token_ids)  # per token: O(1), not a copy of the history
            session.on_chain = True
            return token

    async def _replay(self, session_id: str, session: ChainSession, upto: int) -> None:
        """Open the session afresh on every node and run its history through the chain."""
        history = session.history[:upto]
        if history:
            await self._run(
                session_id, session, history, 0, session.sampling, opens=True, sample=False
            )
        else:
            await self._control(ps.SessionOpen, session_id)
        session.on_chain = True
        self.replays += 1

    async def _run(
        self, session_id, session, token_ids, start, sampling, *, opens: bool, sample: bool = True
    ) -> int | None:
        """Tokens through the chain, a long prompt in chunks of ``prefill_chunk`` (each one's
        hidden states fit a frame, and every node runs other sessions' decode steps between
        two chunks). Only the last chunk samples (unless ``sample`` is False)."""
        last = (len(token_ids) - 1) // self.prefill_chunk * self.prefill_chunk
        for at in range(0, last + 1, self.prefill_chunk):
            reply = await self._send_step(
                session_id,
                session,
                token_ids[at : at + self.prefill_chunk],
                start + at,
                sampling if at == 0 else None,
                opens=opens and at == 0,
                sample=sample and at == last,
            )
        return reply.get("token_id")

    async def _send_step(
        self, session_id, session, token_ids, start, sampling, *, opens, sample
    ) -> dict:
        meta = {  # the ids travel in the tensor only: the first node lists them for the head
            "kind": "forward",
            "network_id": self.transport.network_id,
            "session_id": session_id,
            "message_id": new_message_id(),
            "start": start,
        }
        if sampling is not None:
            meta["sampling"] = sampling.model_dump()
        if not sample:
            meta["sample"] = False
        if opens:
            meta["open"] = True
        if session.priority != limits.DEFAULT_PRIORITY:
            meta["priority"] = session.priority
        if session.route is not None:
            meta["route"] = list(session.route)
        reply, self.last_step = await self.transport.step(meta, token_ids)
        self.stalls.record(len(token_ids), self.last_step.round_trip_ms)
        return reply

    async def _control(
        self, kind: type[ps.Message], session_id: str, route=_ITS_OWN, **fields
    ) -> dict:
        """A control message along the session's chain (``route``: another one)."""
        if route is _ITS_OWN:
            held = self.sessions.get(session_id)
            route = held.route if held is not None else None
        if route is not None:
            fields["route"] = list(route)
        message = kind(network_id=self.transport.network_id, session_id=session_id, **fields)
        return await self.transport.control(message)

    async def _wait_for_heal(self, error: Exception) -> None:
        """The chain failed: report it, then wait for a new chain or the next retry."""
        if self.healthy:
            self.healthy = False
            self.on_broken(error)
        switched = self._switched
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(switched.wait(), self.retry_s)
