"""The block server of one network on one node (seed 003's ``model_node``).

It accepts mutual-TLS WebSocket connections from the network's own nodes only (the TLS context
trusts the network CA alone). The first message must be ``hello``; versions are checked and a
mismatch is refused with a message naming both; then both ends answer each other's challenge
(``node.handshake``) and a node the network removed (the signed config's revocation list) is
refused, also on connections already open when the config that removes it arrives. What a
peer may send follows its certificate's role (``security.access_control``, checked once per
connection). Then:

- binary frames are forward steps: run the span and pass the hidden states to the next node
  over a persistent link; the node holding ``head`` samples the token. The chain's first node
  names itself in the frame (``answer_to``), and the head sends its answer straight there
  instead of back through every node. Errors on the way go there too, and a node whose link
  to the next one drops tells the first node (``link_lost``), so no step waits forever.
  A frame without ``answer_to`` (a peer calling a middle node directly) is answered on its own
  connection, each node relaying the answer of the next;
- text frames are protocol messages (2.0, seed-000 or legacy shape): session control that
  travels the chain (open, close, save, restore), heartbeats, and inference requests, which the
  node's gateway answers when it has one.

Every bad message gets a structured ``error`` reply naming the offending message_id; the
connection and every other session keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import websockets
from pydantic import ValidationError

from tiktrue import limits
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.errors import CorruptBlock, ModelError
from tiktrue.model.sampling import SamplingParams, SessionSampler
from tiktrue.model.store import BlockStore
from tiktrue.node import handshake
from tiktrue.node.block_guard import BlockGuard
from tiktrue.node.peer_link import (
    CLOSE_TIMEOUT,
    HARD_FRAME_LIMIT,
    PeerLink,
    PeerUnavailable,
    new_message_id,
)
from tiktrue.node.step_scheduler import StepScheduler
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import decode_tensor_frame, encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.access_control import block_messages_denied, serves_forward_steps
from tiktrue.security.auth_manager import CertInfo
from tiktrue.security.node_tls import NetworkCredentials, block_keyring

log = logging.getLogger("tiktrue.node")

HELLO_TIMEOUT = 10.0
ANSWER_LINK_RETRY_S = 2.0
SESSION_CONTROL = {
    ps.MessageType.session_open,
    ps.MessageType.session_close,
    ps.MessageType.session_save,
    ps.MessageType.session_restore,
    ps.MessageType.session_truncate,
}
# Client requests (inference) are answered by the gateway living in the same node process.
ClientHandler = Callable[[ps.ParsedMessage, Callable[[dict], Awaitable[None]]], Awaitable[None]]


def error_dict(code: str, message: str, message_id=None, session_id=None, network_id=None):
    err = ps.ProtocolError(code, message, message_id, session_id)
    return ps.error_reply(err, network_id=network_id)


class BlockServer:
    """Serves this node's span of one network's model."""

    def __init__(
        self,
        data_dir: Path,
        config: NetworkConfig,
        credentials: NetworkCredentials,
        *,
        kv_budget_bytes: int = 512 << 20,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.network_id = config.network_id
        self.credentials = credentials
        self.node_id = credentials.identity.node_id
        self.entry = config.node(self.node_id)
        self.active = serves_forward_steps(self.entry.role)  # a backup stands by
        store = BlockStore(
            self.data_dir / "models" / config.model_id, keyring=block_keyring(self.data_dir)
        )
        spill_dir = self.data_dir / "cache" / "kv" / self.network_id
        for stale in spill_dir.glob("*.npz"):  # KV spilled by a run that did not end cleanly
            stale.unlink(missing_ok=True)
        self._span = Span(tuple(self.entry.blocks))
        # the guard notes the files before they are read: a change during the load is seen
        self.guard = BlockGuard(store, self._span.blocks, self._guard_report)
        self._load_faults: dict[str, str] = {}
        self.engine: BlockEngine | None = None  # None: a block failed verification, see fault
        try:
            self.engine = BlockEngine(
                store, self._span, kv_budget_bytes=kv_budget_bytes, spill_dir=spill_dir
            )
        except CorruptBlock as exc:  # the server still runs: it answers every step with it
            self._load_faults = {name: exc.detail for name in exc.blocks}
            log.error("network %s: span %s cannot load: %s", self.network_id, self._span, exc)
        # (network_id, {block: what is wrong}): the node service tells the admin
        self.on_blocks_changed: Callable[[str, dict[str, str]], None] | None = None
        itemsize = 4
        hidden_size = self.engine.hidden_size if self.engine else store.config().hidden_size
        # the largest legitimate frame: the hidden states of the largest step, plus its header
        self.max_frame_bytes = (
            limits.MAX_STEP_TOKENS * hidden_size * itemsize + limits.MAX_FRAME_HEADER_BYTES
        )
        self.samplers: dict[str, SessionSampler] = {}
        self.stats = ps.ProtocolStats()
        self.client_handler: ClientHandler | None = None
        # All torch work runs on this one thread: one OpenMP thread team per process
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.network_id}")
        # decode rounds run on the event loop itself (a step then wakes no other thread);
        # prompt chunks and session control run on the engine thread (they may take long)
        self.steps = StepScheduler(self._executor, self._compute_steps, inline_batches=True)
        self._next: PeerLink | None = None
        next_entry = config.next_node(self.node_id)
        if next_entry is not None:
            self._next = self._link(next_entry, on_lost=self._next_lost)
        self._answer_links: dict[str, PeerLink] = {}  # to the first node, by address
        self._chain_of: NetworkConfig | None = None
        self._chain_ids_cached: list[str] = []
        self._head_connections = 0  # open connections from the chain's head (first node only)
        self._background: set[asyncio.Task] = set()
        self._peers: dict[Any, CertInfo] = {}  # open connection -> its proved certificate
        self._server = None
        # (node_id, why): the node service tells the admin's health monitor
        self.on_peer_lost: Callable[[str, str], None] | None = None

    def _link(self, entry, on_lost=None) -> PeerLink:
        return PeerLink(
            entry.host,
            entry.port,
            network_id=self.network_id,
            credentials=self.credentials,
            role=self.entry.role,
            on_lost=on_lost,
            expected_node_id=entry.node_id,
            revoked=self.config.revoked_ids,
        )

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _chain_ids(self) -> list[str]:
        """The node ids of this network's chain, in order (cached per config)."""
        if self._chain_of is not self.config:
            self._chain_ids_cached = [n.node_id for n in self.config.chain()]
            self._chain_of = self.config
        return self._chain_ids_cached

    @property
    def is_first(self) -> bool:
        return self._chain_ids()[0] == self.node_id

    @property
    def span(self) -> Span:
        return self._span

    # --- the span's block files (see node.block_guard) ---------------------------------------

    @property
    def block_faults(self) -> dict[str, str]:
        """The span's blocks whose files fail verification now, and why."""
        return dict(self.guard.faults)

    def fault(self) -> CorruptBlock:
        """What every request gets while the span could not load (``engine`` is None)."""
        names = sorted(self.guard.faults or self._load_faults)
        return CorruptBlock(
            names,
            f"node {self.node_id} cannot serve {self.span} of network {self.network_id}: "
            "its block files failed verification; it serves again once they are repaired",
        )

    def _guard_report(self, faults: dict[str, str]) -> None:
        """The guard's thread: the set of damaged blocks changed."""
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to tell
            self._loop.call_soon_threadsafe(self._blocks_changed, faults)

    def _blocks_changed(self, faults: dict[str, str]) -> None:
        if faults:
            how = "still serving its verified copy" if self.engine else "not serving"
            log.error("network %s: damaged block files (%s): %s", self.network_id, how, faults)
        else:
            log.warning("network %s: the files of %s verify again", self.network_id, self.span)
        if self.on_blocks_changed is not None:
            self.on_blocks_changed(self.network_id, faults)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.guard.start(self._load_faults)
        if self._load_faults:
            self._blocks_changed(self._load_faults)
        self._server = await websockets.serve(
            self._handle,
            self.entry.host,
            self.entry.port,
            ssl=self.credentials.server_context(),
            max_size=HARD_FRAME_LIMIT,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=CLOSE_TIMEOUT,
        )
        log.info("network %s: serving %s on %s", self.network_id, self.span, self.entry.address)
        self._in_background(self._warm_links())

    async def _warm_links(self) -> None:
        """Open the links a step will use now, so the first answer does not wait for them.

        The head keeps its link to the first node open (retrying while that node is away):
        the first node asks for direct answers only while it sees that link.
        """
        if self._next is not None:
            await _try_connect(self._next)
        while self.span.has_head and len(self._chain_ids()) > 2:
            link = self._answer_link(self._chain_ids()[0])
            if not link.connected:
                await _try_connect(link)
            await asyncio.sleep(ANSWER_LINK_RETRY_S)

    async def update_config(self, config: NetworkConfig) -> None:
        """A new config that keeps this node's span and address (a neighbour changed, or a
        backup was activated): switch in place, without reloading the weights. Steps in
        flight on a link to a replaced neighbour fail; the gateway replays them."""
        self.config = config
        self.entry = config.node(self.node_id)
        self.active = serves_forward_steps(self.entry.role)
        self.drop_revoked()
        old, after = self._next, config.next_node(self.node_id)
        if (after and after.address) != (old and old.address):
            self._next = self._link(after, on_lost=self._next_lost) if after else None
            if old is not None:
                await old.close()
            self._in_background(self._warm_links())

    def drop_revoked(self) -> None:
        """Close the open connections of nodes the current config revokes (at once: a
        removed node's steps stop here, not at its next reconnect)."""
        revoked = self.config.revoked_ids
        for ws, peer in list(self._peers.items()):
            if peer.node_id in revoked:
                log.warning("network %s: closing revoked node %s", self.network_id, peer.node_id)
                self._in_background(ws.close(1008, "certificate revoked"))

    async def stop(self) -> None:
        await asyncio.to_thread(self.guard.stop)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._background):
            task.cancel()
        for link in [self._next, *self._answer_links.values()]:
            if link is not None:
                await link.close()
        self.steps.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.engine is not None:
            self.engine.kv.clear()
        self.engine = None  # release the span's weights now
        self.samplers.clear()

    # --- connections ---------------------------------------------------------------------

    async def _handle(self, ws) -> None:
        accepted = await self._hello(ws)
        if accepted is None:
            return
        hello, peer = accepted
        denied = block_messages_denied(peer.role)  # per connection, not per message
        on_frame = self._refuse_frame if "forward" in denied else self._on_frame
        self._peers[ws] = peer
        # On the chain's first node, a connection from a later node of the chain brings
        # answers (and errors) of steps in flight; the head's tells that it can answer here.
        ids = self._chain_ids()
        brings_answers = self.is_first and hello.node_id in ids[1:]
        from_head = brings_answers and hello.node_id == ids[-1]
        self._head_connections += from_head
        tasks: set[asyncio.Task] = set()
        try:
            async for raw in ws:
                if brings_answers and isinstance(raw, str) and self._take_answer(raw):
                    continue
                if isinstance(raw, bytes):
                    task = asyncio.create_task(on_frame(ws, raw))
                else:
                    task = asyncio.create_task(self._on_text(ws, raw, denied))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._peers.pop(ws, None)
            self._head_connections -= from_head
            if brings_answers and self._next is not None:  # answers in flight on it are lost
                self._next.fail_pending(
                    PeerUnavailable(f"the connection from node {hello.node_id} was lost")
                )

    def _take_answer(self, raw: str) -> bool:
        """A step's answer sent straight to this node (its chain's first): hand it to the
        step waiting for it. The hot path: plain JSON, no validation beyond the match."""
        if self._next is None or not self._next.waiting or len(raw) > 1 << 16:
            return False
        try:
            reply = json.loads(raw)
            kind = reply["header"]["message_type"]
        except (ValueError, KeyError, TypeError):
            return False
        return kind in ("inference_response", "error") and self._next.resolve(reply)

    async def _hello(self, ws) -> tuple[ps.Hello, CertInfo] | None:
        """The peer's hello, answered, and its challenge checked: the hello and the peer's
        certificate; None (connection closed) when it is refused."""
        try:
            raw = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
            parsed = ps.parse_message(raw, max_bytes=1 << 16)
            hello = parsed.message
            if not isinstance(hello, ps.Hello):
                raise ps.ProtocolError(
                    ps.INVALID_MESSAGE,
                    "the first message on a connection must be hello",
                    parsed.message_id,
                )
            if hello.network_id != self.network_id:
                raise ps.ProtocolError(
                    ps.WRONG_NETWORK,
                    f"this server belongs to network {self.network_id}, not {hello.network_id}",
                    hello.message_id,
                )
            try:
                ps.check_versions(
                    ps.SOFTWARE_VERSION,
                    ps.PROTOCOL_VERSION,
                    hello.software_version,
                    hello.protocol_version,
                )
            except ps.ProtocolError as exc:
                exc.message_id = hello.message_id
                raise
            peer = await handshake.accept(
                ws, hello, self.credentials, revoked=self.config.revoked_ids
            )
        except ps.ProtocolError as exc:
            await ws.send(json.dumps(ps.error_reply(exc, network_id=self.network_id)))
            await ws.close(1008, exc.code)
            return None
        except (asyncio.TimeoutError, websockets.ConnectionClosed):
            await ws.close(1008, "no hello")
            return None
        return hello, peer

    # --- the hot path: forward steps -------------------------------------------------------

    async def _on_frame(self, ws, raw: bytes) -> None:
        reply = await self.answer_frame(raw)
        if reply is not None:
            await _send(ws, reply)

    async def _refuse_frame(self, ws, raw: bytes) -> None:
        """A peer whose role may not send steps (see ``security.access_control``)."""
        await _send(ws, error_dict(ps.FORBIDDEN, "this certificate may not send steps"))

    async def answer_frame(self, raw: bytes | tuple[dict, Any]) -> dict | None:
        """The answer to one forward step (a token, or a structured error); None when it goes
        to the node the frame names in ``answer_to`` instead of back on this connection.
        ``raw``: a tensor frame, or its header and tensor (the gateway in this process)."""
        message_id = session_id = answer_to = None
        try:
            if isinstance(raw, tuple):
                header, tensor = raw
            else:
                header, tensor = decode_tensor_frame(raw, max_bytes=self.max_frame_bytes)
            message_id = _opt_str(header.get("message_id"))
            session_id = _opt_str(header.get("session_id"))
            count = tensor.shape[-2] if tensor.dim() == 3 else tensor.numel()
            if count > limits.MAX_STEP_TOKENS:
                raise ps.ProtocolError(
                    ps.FRAME_TOO_LARGE,
                    f"a step carries at most {limits.MAX_STEP_TOKENS} tokens, not {count}: "
                    "prefill a longer prompt in several steps",
                )
            self._check_network(header.get("network_id"), message_id, session_id)
            answer_to = self._answer_to(header, message_id, session_id)
            start = header.get("start")
            if (
                header.get("kind") != "forward"
                or not isinstance(start, int)
                or isinstance(start, bool)
                or message_id is None
            ):
                raise ps.ProtocolError(
                    ps.INVALID_MESSAGE,
                    "a tensor frame must be a forward step with an integer 'start' and a "
                    "'message_id'",
                    message_id,
                    session_id,
                )
            reply = await self._forward(header, tensor, message_id, session_id)
        except ps.ProtocolError as exc:
            exc.message_id = exc.message_id or message_id
            exc.session_id = exc.session_id or session_id
            reply = ps.error_reply(exc, network_id=self.network_id)
        except ModelError as exc:
            reply = error_dict(exc.code, str(exc), message_id, session_id, self.network_id)
        except PeerUnavailable as exc:
            reply = error_dict(exc.code, str(exc), message_id, session_id, self.network_id)
        except ValidationError as exc:
            reply = error_dict(
                ps.INVALID_MESSAGE, f"bad sampling settings: {exc}", message_id, session_id
            )
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("forward step %s failed", message_id)
            reply = error_dict(ps.INTERNAL_ERROR, repr(exc), message_id, session_id)
        elsewhere = answer_to is not None and not self._answers_here(answer_to)
        if reply is not None and elsewhere and await self._deliver(answer_to, reply):
            return None
        return reply  # on this connection (also when the first node is out of reach)

    def _answer_to(self, header: dict, message_id, session_id) -> str | None:
        """Where this step's answer goes: the first node names itself when it passes a step
        on and the head can reach it (the head keeps a connection to it open, or is next);
        a frame without the field is answered on its connection (relayed)."""
        if self.is_first and not self.span.has_head:
            header.pop("answer_to", None)
            if len(self._chain_ids()) <= 2 or self._head_connections > 0:
                header["answer_to"] = self.node_id
                header["timings"] = []
        answer_to = header.get("answer_to")
        if answer_to is None:
            return None
        if not isinstance(answer_to, str) or answer_to not in self._chain_ids():
            raise ps.ProtocolError(
                ps.INVALID_MESSAGE,
                f"answer_to must name a node of network {self.network_id}",
                message_id,
                session_id,
            )
        return answer_to

    def _answers_here(self, answer_to: str) -> bool:
        """Whether the node waiting for the answer is the one at the other end of the
        connection the step came on (the previous node), or this node itself."""
        ids = self._chain_ids()
        if answer_to == self.node_id or self.node_id not in ids:
            return True
        here = ids.index(self.node_id)
        return here > 0 and ids[here - 1] == answer_to

    def _answer_link(self, node_id: str) -> PeerLink:
        entry = self.config.node(node_id)
        link = self._answer_links.get(entry.address)
        if link is None:
            link = self._answer_links[entry.address] = self._link(entry)
        return link

    async def _deliver(self, node_id: str, reply: dict) -> bool:
        """Send an answer (or a link_lost notice) to the node waiting for it. When that fails,
        the connection the node keeps to us has dropped too, and it has failed the step."""
        try:
            await self._answer_link(node_id).send(json.dumps(reply))
            return True
        except (PeerUnavailable, ps.ProtocolError) as exc:
            log.warning(
                "network %s: cannot send an answer to %s: %s", self.network_id, node_id, exc
            )
            return False

    def _next_lost(self, link: PeerLink) -> None:
        """The link to the next node dropped: steps beyond this node will not be answered."""
        after = self.config.next_node(self.node_id)
        if self.on_peer_lost is not None and after is not None:
            self.on_peer_lost(after.node_id, f"the link from {self.node_id} dropped")
        if self.is_first:
            return  # the link itself failed the steps waiting on it
        first = self._chain_ids()[0]
        notice = ps.LinkLost(network_id=self.network_id, node_id=self.node_id, peer=link.address)
        self._in_background(self._deliver(first, notice.model_dump(mode="json")))

    async def _forward(self, header: dict, tensor, message_id, session_id) -> dict | None:
        """Run the span; the head samples and answers, other nodes pass the step on.

        Each node adds its own timing (``timings``: compute and total ms, and the round trip
        of its link to the next node), so the gateway can tell compute from time in transit.
        With ``answer_to`` the timings travel forward in the frame and the head's answer
        carries them all; a node then counts only its own time, not the nodes after it.
        """
        if self.engine is None:
            raise self.fault()
        after = self._next  # a config switch may replace it meanwhile: this step keeps its own
        if not self.active:
            raise PeerUnavailable(
                f"node {self.node_id} is a backup in config v{self.config.version}: it has no "
                "next node and computes no steps until a config makes it active"
            )
        if after is None and not self.span.has_head:
            # a backup (or a node between two configs) has no next node: the sender's config
            # is newer or older than ours; a recoverable error, the gateway replays the step
            raise PeerUnavailable(
                f"node {self.node_id} has no next node in config v{self.config.version} "
                f"(role {self.entry.role}); the chain is switching configs"
            )
        began = time.perf_counter()
        # the decode steps of all sessions ready now run as one batch (see step_scheduler)
        outcome = await self.steps.run(
            session_id, (header, tensor, began), batchable=_positions(tensor) == 1
        )
        direct = "answer_to" in header
        if self.span.has_head:
            reply = self._token_reply(message_id, session_id, outcome)
            mine = self._timing(began, time.perf_counter(), header.get("answer_to"))
            reply["timings"] = [*header.get("timings", []), mine] if direct else [mine]
            return reply
        if direct and not self.is_first:
            await after.send(outcome, resend=False)  # the head answers the first node
            return None
        reply = await after.request(outcome, message_id)
        if not direct:  # relayed: this node's total includes the nodes after it
            computed = header.pop("computed_at")
            reply["timings"] = [
                self._timing(began, computed, None),
                *reply.get("timings", []),
            ]
        return reply

    def _timing(self, began: float, computed: float, answer_to: str | None) -> dict:
        if self._next is not None:
            link = self._next
        elif answer_to is not None and not self._answers_here(answer_to):
            link = self._answer_link(answer_to)
        else:
            link = None
        return {
            "node": self.node_id,
            "span": str(self.span),
            "compute_ms": round((computed - began) * 1000, 3),
            "total_ms": round((time.perf_counter() - began) * 1000, 3),
            "link_rtt_ms": link.latency_ms if link is not None else None,
        }

    def _token_reply(self, message_id: str, session_id: str, token: int | None) -> dict:
        """The head's answer to a step: an inference_response, built without validation
        because every field comes from this node (the hot path)."""
        return {
            "header": {
                "message_id": new_message_id(),
                "message_type": "inference_response",
                "protocol_version": ps.PROTOCOL_VERSION,
                "timestamp": datetime.now(timezone.utc).isoformat(),
            },
            "network_id": self.network_id,
            "session_id": session_id,
            "in_reply_to": message_id,
            "status": "processing",
            "token_id": token,
        }

    def _compute_steps(self, jobs: list[tuple[dict, Any, float]]) -> list:
        """Engine thread: the span's forward of each step (several sessions' decode steps as
        one batch), then each one's sampled token (head) or next frame (which carries this
        node's timing forward when the head answers directly). One result or error per step;
        a step refused before its forward leaves its session's cache as it was."""
        results: list = [None] * len(jobs)
        checked: dict[int, tuple[list[int], SamplingParams | None]] = {}
        for i, (header, tensor, _) in enumerate(jobs):
            try:
                if self.span.has_head:  # checked before the step changes the session's cache
                    sampling = header.get("sampling")
                    params = SamplingParams.model_validate(sampling) if sampling else None
                    checked[i] = (self._fed(header, tensor), params)
                if header.get("open") is True:  # the step opens its session (a round trip less)
                    self._open_session(header.get("session_id"))
            except Exception as exc:  # bad sampling settings or token ids: this step's only
                results[i] = exc
        runs = [i for i in range(len(jobs)) if results[i] is None]
        steps = [(jobs[i][0].get("session_id"), jobs[i][1], jobs[i][0]["start"]) for i in runs]
        if len(steps) == 1:
            try:
                outputs: list = [self.engine.forward(*steps[0])]
            except ModelError as exc:
                outputs = [exc]
        else:
            outputs = self.engine.forward_batch(steps)
        for i, out in zip(runs, outputs, strict=True):
            try:
                done = (
                    out
                    if isinstance(out, Exception)
                    else self._finish(jobs[i], out, checked.get(i))
                )
            except Exception as exc:  # a bug in this step's ending: its error only
                done = exc
            results[i] = done
        return results

    def _finish(self, job: tuple[dict, Any, float], out, checked) -> int | bytes | None:
        """A step's output as its frame for the next node, or (head) its sampled token;
        ``checked``: the head's (token ids fed, sampling settings), read before the forward."""
        header, tensor, began = job
        session_id = header.get("session_id")
        if not self.span.has_head:
            meta = {k: v for k, v in header.items() if k not in ("dtype", "shape")}
            if self.span.has_embed:  # the ids, for the head's repetition penalty: listed once
                meta["tokens"] = tensor.reshape(-1).tolist()
            header["computed_at"] = time.perf_counter()
            if "answer_to" in meta:
                timing = self._timing(began, header["computed_at"], None)
                meta["timings"] = [*(meta.get("timings") or []), timing]
            return encode_tensor_frame(out, **meta)
        sampler = self.samplers.setdefault(session_id, SessionSampler())
        fed, params = checked
        if params is not None:
            sampler.set_params(params)
        if header.get("sample") is False:  # a prompt chunk before the last: no token yet
            sampler.history.extend(fed)
            return None
        return sampler.next_token(out[0], fed)

    def _fed(self, header: dict, tensor) -> list[int]:
        """The token ids this step ran: its tensor where the span embeds them, else as the
        chain's first node listed them in the header."""
        if self.span.has_embed:
            return tensor.reshape(-1).tolist()
        tokens = header.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise ps.ProtocolError(
                ps.INVALID_MESSAGE,
                "a step reaching the head must list its token ids ('tokens')",
                _opt_str(header.get("message_id")),
                _opt_str(header.get("session_id")),
            )
        return tokens

    def _check_network(self, network_id, message_id, session_id) -> None:
        if network_id != self.network_id:
            named = "a message without network_id" if network_id is None else network_id
            raise ps.ProtocolError(
                ps.WRONG_NETWORK,
                f"this server belongs to network {self.network_id}, not {named!s:.80}",
                message_id,
                session_id,
            )

    # --- text messages ---------------------------------------------------------------------

    async def _on_text(self, ws, raw: str, denied: frozenset[str]) -> None:
        reply = await self.answer_text(raw, lambda message: _send(ws, message), denied)
        if reply is not None:
            await _send(ws, reply)

    async def answer_text(self, raw: str, send=None, denied=frozenset()) -> dict | None:
        """The answer to one text message; client requests stream through ``send`` instead.
        ``denied``: the message types the connection's peer may not send."""
        parsed = None
        try:
            parsed = ps.parse_message(raw, max_bytes=self.max_frame_bytes)
            self.stats.record(parsed)
            kind = parsed.message_type
            if kind.value in denied:
                raise ps.ProtocolError(
                    ps.FORBIDDEN,
                    f"this certificate's role may not send {kind.value}",
                    parsed.message_id,
                    parsed.session_id,
                )
            if parsed.network_id is not None or kind in SESSION_CONTROL:
                self._check_network(parsed.network_id, parsed.message_id, parsed.session_id)
            if kind in SESSION_CONTROL:
                reply = await self._session_control(parsed.message)
            elif kind == ps.MessageType.heartbeat:
                reply = self._heartbeat(parsed.message)
            elif kind == ps.MessageType.link_lost:
                lost = parsed.message
                if self._next is not None:
                    self._next.fail_pending(
                        PeerUnavailable(f"node {lost.node_id} lost its link to {lost.peer}")
                    )
                return None
            elif kind in (ps.MessageType.inference_request, ps.MessageType.cancel):
                if self.client_handler is None or send is None:
                    raise ps.ProtocolError(
                        ps.INVALID_MESSAGE,
                        "this node runs no gateway; send inference requests to a gateway node",
                        parsed.message_id,
                        parsed.session_id,
                    )
                await self.client_handler(parsed, send)
                return None
            elif kind == ps.MessageType.authentication:
                reply = ps.Ack(
                    in_reply_to=parsed.message_id,
                    detail="nodes authenticate with network certificates (mutual TLS); "
                    "no license key is needed",
                ).model_dump(mode="json", exclude_none=True)
            else:
                raise ps.ProtocolError(
                    ps.UNKNOWN_MESSAGE_TYPE,
                    f"a block server does not accept {kind.value} messages",
                    parsed.message_id,
                    parsed.session_id,
                )
        except ps.ProtocolError as exc:
            self.stats.record_error()
            reply = ps.error_reply(exc, network_id=self.network_id)
        except (ModelError, PeerUnavailable) as exc:
            reply = error_dict(
                exc.code,
                str(exc),
                parsed.message_id if parsed else None,
                parsed.session_id if parsed else None,
                self.network_id,
            )
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("message failed")
            reply = error_dict(ps.INTERNAL_ERROR, repr(exc), parsed and parsed.message_id)
        return reply

    async def _session_control(self, message) -> dict:
        """Apply locally, then pass along the chain; ack once every later node has."""
        if self.engine is not None:
            info = await self.steps.call(functools.partial(self._apply_session, message))
        elif isinstance(message, ps.SessionClose):
            info = {}  # nothing held here: pass it on
        else:
            raise self.fault()
        if self._next is not None:
            reply = await self._next.request(message, message.message_id)
            if reply.get("header", {}).get("message_type") == "error":
                return reply
            info = {**reply.get("info", {}), **info}
        return ps.Ack(
            in_reply_to=message.message_id,
            network_id=self.network_id,
            session_id=message.session_id,
            info=info,
        ).model_dump(mode="json", exclude_none=True)

    def _open_session(self, sid: str) -> None:
        """Start a session afresh: a gateway replaying a session onto a changed chain may find
        what an unchanged node still holds of it."""
        if self.engine.kv.has(sid):
            self.engine.close_session(sid)
        self.samplers.pop(sid, None)
        self.engine.open_session(sid)

    def _apply_session(self, message) -> dict[str, Any]:
        sid = message.session_id
        folder = self.data_dir / "sessions" / self.network_id / sid
        span_file = folder / f"{self.span.blocks[0]}-{self.span.blocks[-1]}.npz"
        if isinstance(message, ps.SessionOpen):
            self._open_session(sid)
        elif isinstance(message, ps.SessionClose):
            if self.engine.kv.has(sid):  # closing is idempotent and always travels the chain
                self.engine.close_session(sid)
            self.samplers.pop(sid, None)
        elif isinstance(message, ps.SessionSave):
            self.engine.save_session(sid, span_file)
            if self.span.has_head:
                history = self.samplers.get(sid, SessionSampler()).history
                (folder / "history.json").write_text(json.dumps(history), "utf-8")
        elif isinstance(message, ps.SessionTruncate):
            self.engine.truncate_session(sid, message.length)  # PositionError past its end
            sampler = self.samplers.get(sid)
            if sampler is not None:  # the head's history is what the caches hold
                del sampler.history[message.length :]
        elif isinstance(message, ps.SessionRestore):
            if not span_file.is_file():
                raise ps.ProtocolError(
                    ps.SESSION_NOT_FOUND,
                    f"no saved session {sid} for {self.span} on node {self.node_id}",
                    message.message_id,
                    sid,
                )
            if self.engine.kv.has(sid):  # a restore replaces what the node holds of it
                self.engine.close_session(sid)
            self.engine.load_session(sid, span_file)
            if self.span.has_head:
                history = json.loads((folder / "history.json").read_text("utf-8"))
                self.samplers[sid] = SessionSampler(history=history)
        return (
            {f"length@{self.span}": self.engine.session_length(sid)}
            if self.engine.kv.has(sid)
            else {}
        )

    def _heartbeat(self, message) -> dict:
        return ps.Heartbeat(
            node_id=self.node_id,
            network_id=self.network_id,
            cpu_percent=psutil.cpu_percent(None),
            ram_percent=psutil.virtual_memory().percent,
            active_sessions=len(self.engine.kv.sessions()) if self.engine else 0,
        ).model_dump(mode="json", exclude_none=True) | {"in_reply_to": message.message_id}

    def health_stats(self) -> dict:
        """What the admin's heartbeat asks of this span: sessions, KV pages, link round trips,
        and the blocks whose files fail verification (the admin pushes them again)."""
        links = {"next": self._next} if self._next is not None else {}
        links |= {f"answer:{address}": link for address, link in self._answer_links.items()}
        stats = {
            "steps": self.steps.stats.as_dict(),
            "link_rtt_ms": {
                name: link.latency_ms for name, link in links.items() if link.connected
            },
            "block_faults": self.block_faults,
            "loaded": self.engine is not None,  # False: the span could not load its blocks
        }
        if self.engine is not None:
            kv = self.engine.kv.stats()
            stats["sessions"] = len(self.engine.kv.sessions())
            stats["kv_pages_used"] = kv.pages_total - kv.pages_free
            stats["kv_pages_total"] = kv.pages_total
        return stats


async def _try_connect(link: PeerLink) -> None:
    with contextlib.suppress(PeerUnavailable, ps.ProtocolError, OSError):
        await link.connect()


async def _send(ws, message: dict) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        await ws.send(json.dumps(message))


def _positions(tensor) -> int:
    """How many positions a step's input holds: token ids ``[n]`` / ``[1, n]``, or hidden
    states ``[1, n, hidden]`` (the engine refuses other shapes)."""
    return int(tensor.shape[-2] if tensor.dim() == 3 else tensor.shape[-1] if tensor.dim() else 0)


def _opt_str(value) -> str | None:
    return value if isinstance(value, str) and value else None
