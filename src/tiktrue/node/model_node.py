"""The block server of one network on one node (seed 003's ``model_node``).

It loads the node's span (every block verified), starts its span worker (the thread that
computes, ``node.span_worker``) and its chain hop (how steps cross this node,
``node.chain_hop``), and serves the network's port: mutual-TLS WebSocket connections from the
network's own nodes only (the TLS context trusts the network CA alone). The first message must
be ``hello``; versions are checked and a mismatch is refused with a message naming both; then
both ends answer each other's challenge (``node.handshake``) and a node the network removed
(the signed config's revocation list) is refused, also on connections already open when the
config that removes it arrives. What a peer may send follows its certificate's role
(``security.access_control``, checked once per connection). Then:

- binary frames are forward steps (``ChainHop``);
- text frames are protocol messages (2.0, seed-000 or legacy shape): session control that
  travels the chain (``node.session_control``), heartbeats, answers for steps this node entered
  into the chain, ``link_lost``; anything else (inference requests) goes to ``on_message``,
  which the node service sets to its gateway's handler when it runs one.

Every bad message gets a structured ``error`` reply naming the offending message_id; the
connection and every other session keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import websockets

from tiktrue import limits
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.errors import CorruptBlock, ModelError
from tiktrue.node import handshake
from tiktrue.node.chain_hop import ChainHop, error_reply
from tiktrue.node.peer_link import CLOSE_TIMEOUT, HARD_FRAME_LIMIT, PeerUnavailable
from tiktrue.node.served_span import ServedSpan
from tiktrue.node.session_control import CONTROL, travel
from tiktrue.node.span_worker import SpanWorker
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security import connection_limits
from tiktrue.security.access_control import block_messages_denied
from tiktrue.security.auth_manager import CertInfo
from tiktrue.security.connection_limits import SourceLimiter
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.node")

# A message this server does not answer itself (a client's inference request or cancel):
# on_message(parsed, send) streams the answer through ``send``.
MessageHandler = Callable[[ps.ParsedMessage, Callable[[dict], Awaitable[None]]], Awaitable[None]]


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
        self.network_id = config.network_id
        self.credentials = credentials
        self.node_id = credentials.identity.node_id
        self.served = ServedSpan(
            data_dir, config, self.node_id, kv_budget_bytes, self._blocks_changed
        )
        self.hop = ChainHop(
            config,
            credentials,
            self.worker,
            fault=self.fault,
            max_frame_bytes=self.served.max_frame_bytes,
            on_peer_lost=self._peer_lost,
        )
        self.stats = ps.ProtocolStats()
        self.on_message: MessageHandler | None = None  # set by the node service
        # (network_id, {block: what is wrong}): the node service tells the admin
        self.on_blocks_changed: Callable[[str, dict[str, str]], None] | None = None
        # (node_id, why): the node service tells the admin's health monitor
        self.on_peer_lost: Callable[[str, str], None] | None = None
        self._background: set[asyncio.Task] = set()
        self._peers: dict[Any, CertInfo] = {}  # open connection -> its proved certificate
        self._server = None
        # what a stranger may cost this port: its TLS handshakes paced per source (mutual TLS
        # refuses it only after one); a node's own links stay far below the caps
        self.limiter = SourceLimiter()

    @property
    def config(self) -> NetworkConfig:
        return self.hop.config

    @property
    def entry(self):
        """This node's entry in the current config (role, address, blocks)."""
        return self.hop.entry

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _peer_lost(self, node_id: str, why: str) -> None:
        if self.on_peer_lost is not None:
            self.on_peer_lost(node_id, why)

    # --- what it serves (see node.served_span) -----------------------------------------------

    @property
    def span(self) -> Span:
        return self.served.span

    @property
    def engine(self) -> BlockEngine | None:
        """None: a block failed verification (every step gets ``fault()``)."""
        return self.served.engine

    @property
    def worker(self) -> SpanWorker | None:
        return self.served.worker

    @property
    def block_faults(self) -> dict[str, str]:
        return self.served.block_faults

    def fault(self) -> CorruptBlock:
        return self.served.fault(self.network_id)

    def _blocks_changed(self, faults: dict[str, str]) -> None:
        if self.on_blocks_changed is not None:
            self.on_blocks_changed(self.network_id, faults)

    # --- start, change, stop ---------------------------------------------------------------------

    async def start(self) -> None:
        self.served.start(asyncio.get_running_loop())
        entry = self.config.node(self.node_id)
        self._server = await connection_limits.serve(  # per-source caps, before TLS
            self._handle,
            entry.host,
            entry.port,
            ssl_context=self.credentials.server_context(),
            limiter=self.limiter,
            max_size=HARD_FRAME_LIMIT,
            compression=None,
            ping_interval=limits.LINK_PING_INTERVAL_S,
            ping_timeout=limits.LINK_PING_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT,
        )
        log.info("network %s: serving %s on %s", self.network_id, self.span, entry.address)
        self._in_background(self.hop.keep_links())

    async def update_config(self, config: NetworkConfig) -> None:
        """A new config that keeps this node's span and address (a neighbour changed, or a
        backup was activated): switch in place, without reloading the weights."""
        chain_changed = await self.hop.update_config(config)
        self.drop_revoked()
        if chain_changed and self.worker is not None:
            # every session is rebuilt from its first token on the new chain (the gateway
            # replays it) or was closed on it: what this node holds of the old chain is
            # nobody's now (a node that left it, or froze through the change, would keep it)
            freed = await asyncio.wrap_future(self.worker.call(self.worker.sessions.close_all))
            if freed:
                log.info(
                    "network %s: the chain changed, freed %d session(s)", self.network_id, freed
                )

    def drop_revoked(self) -> None:
        """Close the open connections of nodes the current config revokes (at once: a
        removed node's steps stop here, not at its next reconnect)."""
        revoked = self.config.revoked_ids
        for ws, peer in list(self._peers.items()):
            if peer.node_id in revoked:
                log.warning("network %s: closing revoked node %s", self.network_id, peer.node_id)
                self._in_background(ws.close(1008, "certificate revoked"))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.limiter.close()
            await self._server.wait_closed()
        for task in list(self._background):
            task.cancel()
        await self.hop.close()
        self.hop.worker = None
        await asyncio.to_thread(self.served.stop)  # releases the span's weights now

    # --- connections ---------------------------------------------------------------------

    async def _handle(self, ws) -> None:
        accepted = await handshake.greet(
            ws, self.network_id, self.credentials, revoked=self.config.revoked_ids
        )
        if accepted is None:
            return
        hello, peer = accepted
        denied = block_messages_denied(peer.role)  # per connection, not per message
        self._peers[ws] = peer
        tasks: set[asyncio.Task] = set()
        try:
            async for raw in ws:
                # an answer to a step entered here, sent by the chain's head (any member: a
                # backup that took over is the head since a config it connected before)
                if isinstance(raw, str) and self._take_answer(raw):
                    continue
                if isinstance(raw, bytes):
                    task = asyncio.create_task(self._on_frame(ws, raw, denied))
                else:
                    task = asyncio.create_task(self._on_text(ws, raw, denied))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._peers.pop(ws, None)
            if hello.node_id in self.hop.chain_ids[1:] and self.hop.waiting:
                # answers in flight on it are lost: the gateway replays their steps
                self.hop.fail_waiting(
                    PeerUnavailable(f"the connection from node {hello.node_id} was lost")
                )

    def _take_answer(self, raw: str) -> bool:
        """An answer sent straight to this node as a step's entry: hand it to the step
        waiting for it. The hot path: plain JSON, no validation beyond the match."""
        if not self.hop.waiting or len(raw) > 1 << 16:
            return False
        try:
            reply = json.loads(raw)
            kind = reply["header"]["message_type"]
        except (ValueError, KeyError, TypeError):
            return False
        return kind in ("inference_response", "error") and self.hop.take_answer(reply)

    async def _on_frame(self, ws, raw: bytes, denied: frozenset[str]) -> None:
        if "forward" in denied:  # see security.access_control
            reply = error_reply(ps.FORBIDDEN, "this certificate may not send steps")
        else:
            reply = await self.hop.on_frame(raw)
        if reply is not None:
            await _send(ws, reply)

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
            parsed = ps.parse_message(raw, max_bytes=self.served.max_frame_bytes)
            self.stats.record(parsed)
            kind = parsed.message_type
            if kind.value in denied:
                raise ps.ProtocolError(
                    ps.FORBIDDEN,
                    f"this certificate's role may not send {kind.value}",
                    parsed.message_id,
                    parsed.session_id,
                )
            message = parsed.message
            if parsed.network_id is not None or isinstance(message, CONTROL):
                _check_network(self.network_id, parsed)
            if isinstance(message, CONTROL):
                return await travel(
                    message,
                    self._apply_here,
                    self.hop.link_after(message.route),
                    network_id=self.network_id,
                    timeout=limits.CONTROL_DEADLINE_S,
                )
            if kind == ps.MessageType.heartbeat:
                return self._heartbeat(message)
            if kind == ps.MessageType.link_lost:
                self.hop.fail_waiting(
                    PeerUnavailable(f"node {message.node_id} lost its link to {message.peer}")
                )
                return None
            if kind == ps.MessageType.authentication:
                return ps.Ack(
                    in_reply_to=parsed.message_id,
                    detail="nodes authenticate with network certificates (mutual TLS); "
                    "no license key is needed",
                ).model_dump(mode="json", exclude_none=True)
            if kind in (ps.MessageType.inference_request, ps.MessageType.cancel):
                if self.on_message is None or send is None:
                    raise ps.ProtocolError(
                        ps.INVALID_MESSAGE,
                        "this node runs no gateway; send inference requests to a gateway node",
                        parsed.message_id,
                        parsed.session_id,
                    )
                await self.on_message(parsed, send)
                return None
            raise ps.ProtocolError(
                ps.UNKNOWN_MESSAGE_TYPE,
                f"a block server does not accept {kind.value} messages",
                parsed.message_id,
                parsed.session_id,
            )
        except ps.ProtocolError as exc:
            self.stats.record_error()
            return ps.error_reply(exc, network_id=self.network_id)
        except (ModelError, PeerUnavailable) as exc:
            return error_reply(
                exc.code,
                str(exc),
                parsed.message_id if parsed else None,
                parsed.session_id if parsed else None,
                self.network_id,
            )
        except Exception:  # a bug: logged here, a plain answer there, and keep serving
            log.exception("message failed")
            return error_reply(
                ps.INTERNAL_ERROR, "the node failed on this message", parsed and parsed.message_id
            )

    async def _apply_here(self, message: ps.Message) -> dict[str, Any]:
        """A control message on this node's span, on the worker's thread (between rounds)."""
        if self.worker is not None:
            return await asyncio.wrap_future(
                self.worker.call(lambda: self.worker.sessions.apply(message))
            )
        if isinstance(message, ps.SessionClose):
            return {}  # nothing held here: pass it on
        raise self.fault()

    def _heartbeat(self, message) -> dict:
        return ps.Heartbeat(
            node_id=self.node_id,
            network_id=self.network_id,
            cpu_percent=psutil.cpu_percent(None),
            ram_percent=psutil.virtual_memory().percent,
            active_sessions=self.served.health_stats().get("sessions", 0),
        ).model_dump(mode="json", exclude_none=True) | {"in_reply_to": message.message_id}

    def health_stats(self) -> dict:
        """What the admin's heartbeat asks of this span (see ``ServedSpan.health_stats``)."""
        return {**self.served.health_stats(), "link_rtt_ms": self.hop.link_rtts()}


def _check_network(network_id: str, parsed: ps.ParsedMessage) -> None:
    if parsed.network_id != network_id:
        named = parsed.network_id or "a message without network_id"
        raise ps.ProtocolError(
            ps.WRONG_NETWORK,
            f"this server belongs to network {network_id}, not {named!s:.80}",
            parsed.message_id,
            parsed.session_id,
        )


async def _send(ws, message: dict) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        await ws.send(json.dumps(message))
