"""The gateway's client of a network's chain: runs every step on the network's nodes.

``RemoteChain`` sends token ids to the node holding ``embed``; hidden states travel node to
node; the node holding ``head`` samples and its token comes back. ``ReplayingChain`` remembers
what each session fed, so a replacement worker can rebuild its cache by replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from tiktrue import limits
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.peer_link import PeerLink, PeerUnavailable, new_message_id
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.gateway")


class ChainError(Exception):
    """A node of the chain answered with an error (or the gateway refused the request)."""

    def __init__(self, code: str, message: str, info: dict | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.info = info


def _raise_if_error(reply: dict) -> dict:
    if reply.get("header", {}).get("message_type") == "error":
        raise ChainError(reply.get("code", "error"), reply.get("message", ""))
    return reply


def new_session_id() -> str:
    return f"tmp-{uuid.uuid4().hex}"


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


class LocalEntry:
    """The first node of the chain when it runs in the gateway's own process: requests go to
    its block server directly, without a TLS hop to itself."""

    def __init__(self, server) -> None:
        self.server = server

    async def request(self, payload: bytes | tuple | ps.Message, message_id: str) -> dict:
        if isinstance(payload, bytes | tuple):
            return await self.server.answer_frame(payload)
        return await self.server.answer_text(ps.make_message(payload))

    async def close(self) -> None:
        return None


class RemoteChain:
    """The network's chain as one object with ``step`` (see ``tiktrue.model.generation``).

    ``local_server``, when given, returns this process's block server of the network (or
    None); when that server is the chain's first node, steps are handed to it in-process.
    """

    def __init__(
        self,
        config: NetworkConfig,
        credentials: NetworkCredentials,
        local_server=None,
        *,
        prefill_chunk: int = limits.PREFILL_CHUNK_TOKENS,
    ) -> None:
        entry = config.chain()[0]
        self.prefill_chunk = prefill_chunk
        self.entry_node_id = entry.node_id
        self.local_server = local_server or (lambda: None)
        self.network_id = config.network_id
        self.link = PeerLink(
            entry.host,
            entry.port,
            network_id=config.network_id,
            credentials=credentials,
            role=credentials.info.role,
            expected_node_id=entry.node_id,
            revoked=config.revoked_ids,
        )
        self.last_step: StepTiming | None = None
        self._opening: set[str] = set()  # opened here, to be opened on the nodes by a step

    async def step(
        self,
        session_id: str,
        token_ids: list[int],
        start: int,
        sampling: SamplingParams | None = None,
    ) -> int:
        """Run ``token_ids`` through the chain; the token the head samples after them.

        A long prompt goes in chunks of ``prefill_chunk`` tokens, one after the other: each
        chunk's hidden states fit a frame, and each worker runs other sessions' decode steps
        between two chunks. Only the last chunk samples a token."""
        last = (len(token_ids) - 1) // self.prefill_chunk * self.prefill_chunk
        for at in range(0, last, self.prefill_chunk):
            chunk = token_ids[at : at + self.prefill_chunk]
            await self._step(session_id, chunk, start + at, sampling if at == 0 else None, False)
        reply = await self._step(
            session_id, token_ids[last:], start + last, sampling if last == 0 else None, True
        )
        return int(reply["token_id"])

    async def _step(self, session_id, token_ids, start, sampling, sample: bool) -> dict:
        message_id = new_message_id()
        meta = {  # the ids travel in the tensor only: the first node lists them for the head
            "kind": "forward",
            "network_id": self.network_id,
            "session_id": session_id,
            "message_id": message_id,
            "start": start,
        }
        if sampling is not None:
            meta["sampling"] = sampling.model_dump()
        if not sample:
            meta["sample"] = False
        opening = session_id in self._opening
        if opening:
            meta["open"] = True
        ids = torch.tensor(token_ids, dtype=torch.long)
        began = time.perf_counter()
        entry = self._entry()
        # in this process the first node takes the step as it is: no frame to encode and read
        step = (meta, ids) if isinstance(entry, LocalEntry) else encode_tensor_frame(ids, **meta)
        reply = _raise_if_error(await entry.request(step, message_id))
        self.last_step = StepTiming(
            (time.perf_counter() - began) * 1000,
            reply.get("timings", []),
            0.0 if isinstance(entry, LocalEntry) else entry.latency_ms,
        )
        if opening:
            self._opening.discard(session_id)
        return reply

    async def control(self, kind: type[ps.Message], session_id: str, **fields) -> dict:
        if session_id in self._opening and kind is not ps.SessionOpen:
            self._opening.discard(session_id)
            if kind is not ps.SessionClose:  # e.g. saved before any step: open it for real
                await self.control(ps.SessionOpen, session_id)
        message = kind(network_id=self.network_id, session_id=session_id, **fields)
        return _raise_if_error(await self._entry().request(message, message.message_id))

    def _entry(self):
        server = self.local_server()
        if server is not None and server.node_id == self.entry_node_id and server.engine:
            return LocalEntry(server)
        return self.link

    async def open(self, session_id: str) -> None:
        """Open a session: its first step opens it on every node (no round trip of its own)."""
        self._opening.add(session_id)

    async def close(self, session_id: str) -> None:
        await self.control(ps.SessionClose, session_id)

    async def aclose(self) -> None:
        await self.link.close()


RECOVERABLE = {"peer_unavailable", "unknown_session"}
RETRY_S = 2.0  # while the chain is broken, try it again this often (a node may come back)
STALL_S = 5.0  # a step still unanswered after this long makes the admin check the chain
HEAL_CEILING_S = 600.0  # an answer waits this long for the network to heal, then fails
CLOSE_TIMEOUT_S = 10.0  # freeing a session on the nodes: a hung node must not hold the caller


class ReplayingChain:
    """The chain as the gateway uses it: it remembers what each session fed, so when the chain
    changes (a new config, a node replaced) a session is rebuilt on the new chain by replaying
    its tokens; the answer pauses, and no token is lost or repeated.

    A step that fails because a node is unreachable reports the broken chain (``on_broken``:
    the admin's failover takes it from there), then waits for a new chain (``switch``) or
    tries the same one again every ``RETRY_S`` (the node may return), up to ``heal_ceiling``.
    A step unanswered for ``stall_s`` (a node hangs) is reported too, and goes on waiting:
    a new chain fails it (the old links close) and it is replayed there.
    ``healthy`` is False from such a failure until a step or a probe gets through again.
    """

    def __init__(
        self,
        chain: RemoteChain,
        *,
        on_broken=None,
        retry_s: float = RETRY_S,
        stall_s: float = STALL_S,
        heal_ceiling: float = HEAL_CEILING_S,
    ) -> None:
        self.inner = chain
        self.fed: dict[str, list[int]] = {}
        self.sampling: dict[str, SamplingParams] = {}
        self.stale: set[str] = set()
        self.on_broken = on_broken or (lambda error: None)
        self.retry_s, self.stall_s, self.heal_ceiling = retry_s, stall_s, heal_ceiling
        self.replays = 0
        self.healthy = True
        self._switched = asyncio.Event()
        self._closing: set[asyncio.Task] = set()

    @property
    def last_step(self) -> StepTiming | None:
        return self.inner.last_step

    def switch(self, chain: RemoteChain) -> None:
        old, self.inner = self.inner, chain
        self.stale |= set(self.fed)
        self._in_background(old.aclose())  # steps still waiting on it fail and are replayed
        self._switched.set()
        self._switched = asyncio.Event()

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._closing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._closing.discard)

    async def open(self, session_id: str) -> None:
        await self.inner.open(session_id)
        self.fed[session_id] = []

    async def close(self, session_id: str) -> None:
        self.fed.pop(session_id, None)
        self.sampling.pop(session_id, None)
        self.stale.discard(session_id)
        # also when stale: nodes of the current chain that were in the old one still hold it
        # (bounded: a hung node must not hold the caller; the idle sweep frees it later)
        with contextlib.suppress(ChainError, PeerUnavailable, asyncio.TimeoutError):
            await asyncio.wait_for(self.inner.close(session_id), CLOSE_TIMEOUT_S)

    async def control(self, kind, session_id: str, **fields) -> dict:
        return await self.inner.control(kind, session_id, **fields)

    async def truncate(self, session_id: str, length: int) -> None:
        """Rewind a session to its first ``length`` tokens on every node (KV caches and the
        head's history). A session the nodes do not hold now (stale) is only cut here: its
        replay rebuilds the shorter history. A rewind that fails on the way makes the session
        stale, so it is rebuilt by replay, never continued from a half-rewound chain."""
        del self.fed.setdefault(session_id, [])[length:]
        if session_id in self.stale:
            return
        try:
            await self.inner.control(ps.SessionTruncate, session_id, length=length)
        except (ChainError, PeerUnavailable) as exc:
            log.info(
                "session %s: rewind to %d failed (%s); it will be replayed", session_id, length, exc
            )
            self.stale.add(session_id)

    async def step(self, session_id, token_ids, start, sampling=None) -> int:
        if sampling is not None:
            self.sampling[session_id] = sampling
        began = time.monotonic()
        while True:
            try:
                if session_id in self.stale:
                    await self._replay(session_id, start)
                token = await self._watched(self.inner.step(session_id, token_ids, start, sampling))
            except (PeerUnavailable, ChainError) as exc:
                code = getattr(exc, "code", "peer_unavailable")
                if code not in RECOVERABLE or time.monotonic() - began > self.heal_ceiling:
                    raise
                self.stale.add(session_id)
                await self.wait_for_heal(exc)
                continue
            self.healthy = True
            fed = self.fed.setdefault(session_id, [])
            del fed[start:]  # a no-op unless the session was rewound
            fed.extend(token_ids)  # per token: O(1), not a copy of the history
            return token

    async def _watched(self, step):
        """Await ``step``; when it takes longer than ``stall_s``, report the chain once. (A
        timer, not a task per step: this runs for every token.)"""
        error = TimeoutError(f"a step waited {self.stall_s:.0f} s for the chain")
        timer = asyncio.get_running_loop().call_later(self.stall_s, self.on_broken, error)
        try:
            return await step
        finally:
            timer.cancel()

    async def wait_for_heal(self, error: Exception) -> None:
        """The chain failed: report it, then wait for a new chain or the next retry."""
        if self.healthy:
            self.healthy = False
            self.on_broken(error)
        switched = self._switched
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(switched.wait(), self.retry_s)

    async def probe(self, timeout: float = 2.0) -> bool:
        """Whether the whole chain answers now (a session close travels every node and
        computes nothing); sets ``healthy``."""
        try:
            await asyncio.wait_for(self.inner.close(f"probe-{uuid.uuid4().hex}"), timeout)
        except (PeerUnavailable, ChainError, asyncio.TimeoutError):
            return False
        self.healthy = True
        return True

    async def _replay(self, session_id: str, upto: int) -> None:
        """Open the session on the current chain and run its history through it."""
        with contextlib.suppress(ChainError):
            await self.inner.close(session_id)
        await self.inner.open(session_id)
        history = self.fed.get(session_id, [])[:upto]
        if history:
            await self.inner.step(session_id, history, 0, self.sampling.get(session_id))
        self.stale.discard(session_id)
        self.replays += 1

    async def aclose(self) -> None:
        await self.inner.aclose()

    def adopt(self, session_id: str, history: list[int], *, stale: bool) -> None:
        """Take over a session whose history comes from elsewhere (the gateway's store after a
        restart, a restored save): ``stale`` when the nodes do not hold it, so its next step
        replays ``history`` first."""
        self.fed[session_id] = list(history)
        if stale:
            self.stale.add(session_id)
        else:
            self.stale.discard(session_id)

    async def rebuild(self, session_id: str, upto: int) -> None:
        """Replay a stale session now (before a save), not at its next step."""
        if session_id in self.stale:
            await self._replay(session_id, upto)
