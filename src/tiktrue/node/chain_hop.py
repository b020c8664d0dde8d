"""``ChainHop``: how a forward step crosses one node (the transport of a block server).

A step arrives as a tensor frame, is checked, and is handed to the span worker; its result
goes on: the hidden states to the next node of the chain, or, at the head, the sampled token
to the step's *entry*: the node where the step came into the chain (the chain's first node
when a gateway sends it), which answers on the connection the step came on. One routing mode:
the entry names itself in the frame (``reply_to``) and every later node passes that on; the
head's answer, and an error met anywhere on the way, go straight to the entry, never back
through the chain (half the hops). Each node adds its own timing to the frame (``timings``),
so the answer tells compute from time in transit.

The entry waits for each answer with a deadline; a node whose link to the next one drops
tells the chain's first node (``link_lost``), which fails the steps it waits for at once (the
gateway replays them), and tells the admin (``on_peer_lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from pydantic import ValidationError

from tiktrue import limits
from tiktrue.model.errors import ModelError
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.peer_link import PeerLink, PeerUnavailable, new_message_id
from tiktrue.node.span_worker import SpanWorker, Step, StepResult
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import decode_tensor_frame, encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.access_control import serves_forward_steps
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.node")
ANSWER_LINK_RETRY_S = 2.0  # the head keeps its link to the chain's first node open this often


class ChainHop:
    """Steps through one node's span of one network (see the module's docstring)."""

    def __init__(
        self,
        config: NetworkConfig,
        credentials: NetworkCredentials,
        worker: SpanWorker | None,
        *,
        fault: Callable[[], Exception],
        max_frame_bytes: int,
        on_peer_lost: Callable[[str, str], None],
    ) -> None:
        """``worker`` is None while the span's blocks fail verification: every step then
        gets ``fault()``. ``on_peer_lost(node_id, why)``: the link to a node dropped."""
        self.credentials = credentials
        self.node_id = credentials.identity.node_id
        self.worker = worker
        self.fault = fault
        self.max_frame_bytes = max_frame_bytes
        self.on_peer_lost = on_peer_lost
        # entry: message_id -> its answer, and the link it left on
        self._waiting: dict[str, tuple[asyncio.Future, PeerLink]] = {}
        # by node id: to entries (the head's answers) and to the next nodes of replica routes
        self._links: dict[str, PeerLink] = {}
        self._set(config)
        after = config.next_node(self.node_id)
        self._next: PeerLink | None = self._link(after, self._next_lost) if after else None

    # --- the chain ----------------------------------------------------------------------------

    def _set(self, config: NetworkConfig) -> None:
        self.config = config
        self.network_id = config.network_id
        self.entry = config.node(self.node_id)
        self.span_blocks = tuple(self.entry.blocks)
        self.chain_ids = [n.node_id for n in config.chain()]
        self.active = serves_forward_steps(self.entry.role)  # a backup stands by

    @property
    def has_head(self) -> bool:
        return self.span_blocks[-1] == "head"

    @property
    def has_embed(self) -> bool:
        return self.span_blocks[0] == "embed"

    def link_after(self, route: list[str] | None = None) -> PeerLink | None:
        """The link to the next node: of the chain, or of ``route`` (a replica chain)."""
        return self._next if route is None else self._along(route)

    def _along(self, route) -> PeerLink | None:
        """The link to the node after this one on a step's own route: a replica chain, the
        chain with a run of its nodes served by the backup that replicates them (the
        gateway chooses it; see ``NetworkConfig.replica_chains``). None: this node is the
        route's last."""
        members = self.config.node_ids
        if (
            not isinstance(route, list)
            or self.node_id not in route
            or len(set(route)) != len(route)
            or not all(isinstance(n, str) and n in members for n in route)
        ):
            raise ps.ProtocolError(
                ps.INVALID_MESSAGE,
                f"a route lists nodes of network {self.network_id} once each, this one among them",
            )
        at = route.index(self.node_id) + 1
        return self._answer_link(route[at]) if at < len(route) else None

    async def update_config(self, config: NetworkConfig) -> bool:
        """A config that keeps this node's span: neighbours or role changed. Steps this node
        entered into the old chain fail; the gateway replays them on the new one. Returns
        whether the chain changed."""
        old_next, old_chain = self.config.next_node(self.node_id), self.chain_ids
        self._set(config)
        changed = self.chain_ids != old_chain
        if changed:  # steps entered here went down the old chain
            self.fail_waiting(PeerUnavailable(f"the chain changed (config v{config.version})"))
        after = config.next_node(self.node_id)
        if (after and after.address) != (old_next and old_next.address):
            old, self._next = self._next, self._link(after, self._next_lost) if after else None
            if old is not None:
                await old.close()
        for node_id, link in list(self._links.items()):
            # off the chain now, or moved (a restored admin on another PC): a new link
            if node_id not in self.chain_ids or config.node(node_id).address != link.address:
                await self._links.pop(node_id).close()
        return changed

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

    def _answer_link(self, node_id: str) -> PeerLink:
        link = self._links.get(node_id)
        if link is None:
            link = self._links[node_id] = self._link(self.config.node(node_id), self._link_lost)
        return link

    def _link_lost(self, link: PeerLink) -> None:
        """A link to a node off the chain dropped (a replica route's next node): the steps
        sent on it will not be answered."""
        self.fail_waiting(PeerUnavailable(f"the link to {link.address} was lost"), via=link)

    async def keep_links(self) -> None:
        """Keep open the links a step will use (the next node's; the head's to the chain's
        first node, which its answers take), so no answer waits for a connection: checked
        every ``ANSWER_LINK_RETRY_S`` while the server runs."""
        while True:
            wanted = [self._next]
            if self.has_head and self.chain_ids and self.chain_ids[0] != self.node_id:
                wanted.append(self._answer_link(self.chain_ids[0]))
            for link in wanted:
                if link is not None and not link.connected:
                    await _try_connect(link)
            await asyncio.sleep(ANSWER_LINK_RETRY_S)

    def link_rtts(self) -> dict[str, float | None]:
        links = {"next": self._next} if self._next is not None else {}
        links |= {f"answer:{node}": link for node, link in self._links.items()}
        return {name: link.latency_ms for name, link in links.items() if link.connected}

    async def close(self) -> None:
        self.fail_waiting(PeerUnavailable(f"node {self.node_id} is stopping"))
        for link in [self._next, *self._links.values()]:
            if link is not None:
                await link.close()

    # --- a step ------------------------------------------------------------------------------

    async def on_frame(self, raw: bytes) -> dict | None:
        """A step from the network: its answer (for this connection), or None when it went on."""
        try:
            header, tensor = decode_tensor_frame(raw, max_bytes=self.max_frame_bytes)
        except ps.ProtocolError as exc:
            return ps.error_reply(exc, network_id=self.network_id)
        return await self.step(header, tensor)

    async def step(self, header: dict, tensor) -> dict | None:
        """Run one step here and send it on. Returns the answer when this node is the step's
        entry (the token, or a structured error), else None (it went to the next node, or
        its answer or error to the entry)."""
        began = time.perf_counter()
        message_id, session_id = (
            _opt_str(header.get("message_id")),
            _opt_str(header.get("session_id")),
        )
        reply_to = None
        try:
            reply_to = _reply_to(header, self.chain_ids, self.network_id)
            if self.worker is None:
                raise self.fault()
            route = header.get("route")  # None: the chain; else a replica chain's nodes
            if not self.active and route is None:
                raise PeerUnavailable(
                    f"node {self.node_id} is a backup in config v{self.config.version}: it "
                    "has no next node and computes no steps until a config makes it active"
                )
            step = step_of_frame(
                header, tensor, self.network_id, has_embed=self.has_embed, head=self.has_head
            )
            # a config switch may replace the next link meanwhile: this step keeps its own
            after = self._next if route is None else self._along(route)
            if after is None and not self.has_head:
                raise PeerUnavailable(
                    f"node {self.node_id} has no next node in config v{self.config.version}; "
                    "the chain is switching configs"
                )
            result: StepResult = await asyncio.wrap_future(self.worker.submit(step))
            timings = [*(header.get("timings") or []), self._timing(began, result, after)]
            if self.has_head:
                reply = token_reply(self.network_id, message_id, session_id, result.token)
                reply["timings"] = timings
            else:
                frame = self._next_frame(header, tensor, result, reply_to, timings)
                if reply_to is not None:
                    await after.send(frame, resend=False)  # the head answers the entry
                    return None
                reply = await self._pass_and_wait(after, frame, message_id)
        except ps.ProtocolError as exc:
            exc.message_id = exc.message_id or message_id
            exc.session_id = exc.session_id or session_id
            reply = ps.error_reply(exc, network_id=self.network_id)
        except (ModelError, PeerUnavailable) as exc:
            reply = error_reply(exc.code, str(exc), message_id, session_id, self.network_id)
        except ValidationError as exc:
            reply = error_reply(
                ps.INVALID_MESSAGE,
                f"bad sampling settings: {_first_error(exc)}",
                message_id,
                session_id,
                self.network_id,
            )
        except Exception:  # a bug: logged here, a plain answer there, and keep serving
            log.exception("forward step %s failed", message_id)
            reply = error_reply(
                ps.INTERNAL_ERROR, "the node failed on this step", message_id, session_id
            )
        if reply_to is not None and reply_to != self.node_id:
            await self._deliver(reply_to, reply)
            return None
        return reply

    def _next_frame(self, header, tensor, result: StepResult, reply_to, timings) -> bytes:
        meta = {k: v for k, v in header.items() if k not in ("dtype", "shape")}
        meta["reply_to"] = reply_to or self.node_id
        meta["timings"] = timings
        if self.has_embed:  # the ids, for the head's repetition penalty: listed once
            meta["tokens"] = tensor.reshape(-1).tolist()
        return encode_tensor_frame(result.hidden, **meta)

    def _timing(self, began: float, result: StepResult, after: PeerLink | None) -> dict:
        link = after if after is not None else self._links.get(self.chain_ids[0])
        return {
            "node": self.node_id,
            "span": f"{self.span_blocks[0]}..{self.span_blocks[-1]}",
            "compute_ms": result.compute_ms,
            "total_ms": round((time.perf_counter() - began) * 1000, 3),
            "link_rtt_ms": link.latency_ms if link is not None and link.connected else None,
        }

    # --- answers, at the entry ----------------------------------------------------------------

    async def _pass_and_wait(self, after: PeerLink, frame: bytes, message_id: str) -> dict:
        """This node is the step's entry: send it on and wait for the head's answer."""
        waiting = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = (waiting, after)
        try:
            await after.send(frame, resend=False)
            return await asyncio.wait_for(waiting, limits.STEP_DEADLINE_S)
        except asyncio.TimeoutError:
            raise PeerUnavailable(
                f"the chain gave no answer in {limits.STEP_DEADLINE_S:.0f} s"
            ) from None
        finally:
            self._waiting.pop(message_id, None)

    def take_answer(self, reply: dict) -> bool:
        """An answer (or error) for a step this node waits for as its entry."""
        waiting = self._waiting.pop(str(reply.get("in_reply_to")), None)
        if waiting is None or waiting[0].done():
            return False
        waiting[0].set_result(reply)
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def fail_waiting(self, error: Exception, via: PeerLink | None = None) -> None:
        """Fail the steps this node waits for as their entry (``via``: those sent on it)."""
        for message_id, (future, link) in list(self._waiting.items()):
            if via is None or link is via:
                del self._waiting[message_id]
                if not future.done():
                    future.set_exception(error)

    async def _deliver(self, node_id: str, reply: dict) -> None:
        """Send an answer (or a link_lost notice) to the entry waiting for it. When that
        fails, the entry's own link to us has dropped too, and it has failed the step."""
        try:
            await self._answer_link(node_id).send(json.dumps(reply))
        except (PeerUnavailable, ps.ProtocolError) as exc:
            log.warning("network %s: no answer can reach %s: %s", self.network_id, node_id, exc)

    def _next_lost(self, link: PeerLink) -> None:
        """The link to the next node dropped: steps beyond this node will not be answered."""
        after = self.config.next_node(self.node_id)
        if after is not None:
            self.on_peer_lost(after.node_id, f"the link from {self.node_id} dropped")
        self.fail_waiting(PeerUnavailable(f"the link to {link.address} was lost"), via=link)
        first = self.chain_ids[0] if self.chain_ids else self.node_id
        if first != self.node_id:
            notice = ps.LinkLost(
                network_id=self.network_id, node_id=self.node_id, peer=link.address
            )
            task = asyncio.get_running_loop().create_task(
                self._deliver(first, notice.model_dump(mode="json"))
            )
            _keep(task)


def step_of_frame(header: dict, tensor, network_id: str, *, has_embed: bool, head: bool) -> Step:
    """A frame's step, every field checked before it can change a session's cache."""
    count = tensor.shape[-2] if tensor.dim() == 3 else tensor.numel()
    if count > limits.MAX_STEP_TOKENS:
        raise ps.ProtocolError(
            ps.FRAME_TOO_LARGE,
            f"a step carries at most {limits.MAX_STEP_TOKENS} tokens, not {count}: "
            "prefill a longer prompt in several steps",
        )
    if header.get("network_id") != network_id:
        named = header.get("network_id") or "a step without network_id"
        raise ps.ProtocolError(
            ps.WRONG_NETWORK, f"this server belongs to network {network_id}, not {named!s:.80}"
        )
    start, session_id = header.get("start"), _opt_str(header.get("session_id"))
    if (
        header.get("kind") != "forward"
        or not isinstance(start, int)
        or isinstance(start, bool)
        or _opt_str(header.get("message_id")) is None
        or session_id is None
    ):
        raise ps.ProtocolError(
            ps.INVALID_MESSAGE,
            "a tensor frame must be a forward step with an integer 'start', a 'message_id' "
            "and a 'session_id'",
        )
    sampling = header.get("sampling")
    try:
        priority = _RANKS[header.get("priority")]
    except (KeyError, TypeError):  # not a class's name (a list is no key at all)
        raise ps.ProtocolError(
            ps.INVALID_MESSAGE,
            f"a step's priority is one of {', '.join(limits.PRIORITIES)} (or left out: "
            f"{limits.DEFAULT_PRIORITY})",
        ) from None
    return Step(
        session_id=session_id,
        start=start,
        inputs=tensor,
        tokens=tuple(_head_tokens(header, tensor, has_embed)) if head else (),
        sampling=SamplingParams.model_validate(sampling) if sampling else None,
        sample=header.get("sample") is not False,
        opens=header.get("open") is True,
        priority=priority,
    )


# a step's class in its header ("priority"; left out: the default) -> its rank
_RANKS = {None: limits.PRIORITY_RANK[limits.DEFAULT_PRIORITY], **limits.PRIORITY_RANK}


def _head_tokens(header: dict, tensor, has_embed: bool) -> list[int]:
    """The ids a step runs: its tensor where the span embeds them, else as the chain's first
    node listed them in the header."""
    if has_embed:
        return tensor.reshape(-1).tolist()
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise ps.ProtocolError(
            ps.INVALID_MESSAGE, "a step reaching the head must list its token ids ('tokens')"
        )
    return tokens


def token_reply(network_id: str, message_id, session_id, token: int | None) -> dict:
    """The head's answer: an inference_response, built without validation because every
    field comes from this node (the hot path)."""
    return {
        "header": {
            "message_id": new_message_id(),
            "message_type": "inference_response",
            "protocol_version": ps.PROTOCOL_VERSION,
            "timestamp": datetime.now(timezone.utc).isoformat(),
        },
        "network_id": network_id,
        "session_id": session_id,
        "in_reply_to": message_id,
        "status": "processing",
        "token_id": token,
    }


_TASKS: set[asyncio.Task] = set()


def _keep(task: asyncio.Task) -> None:
    _TASKS.add(task)  # a reference until it is done
    task.add_done_callback(_TASKS.discard)


async def _try_connect(link: PeerLink) -> None:
    with contextlib.suppress(PeerUnavailable, ps.ProtocolError, OSError):
        await link.connect()


def error_reply(code: str, message: str, message_id=None, session_id=None, network_id=None):
    return ps.error_reply(
        ps.ProtocolError(code, message, message_id, session_id), network_id=network_id
    )


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "value"
    return f"{where}: {error.get('msg', 'invalid')}"


def _opt_str(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _reply_to(header: dict, chain_ids: list[str], network_id: str) -> str | None:
    """The step's entry, when it is not this node (None: the step enters here)."""
    reply_to = header.get("reply_to")
    if reply_to is None:
        return None
    if not isinstance(reply_to, str) or reply_to not in chain_ids:
        raise ps.ProtocolError(
            ps.INVALID_MESSAGE, f"reply_to must name a node of network {network_id}'s chain"
        )
    return reply_to
