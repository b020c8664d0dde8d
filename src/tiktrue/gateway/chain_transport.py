"""How the gateway's messages reach a network's chain: handed to the chain's first node in this
process when this process runs it (no TLS hop to itself, no frame to encode), else sent over a
mutual-TLS link to it. Every round trip has a deadline (``limits``); a node's error reply is
raised as a ``ChainError``. What a step or a control message means is ``chain_client``'s."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tiktrue import limits
from tiktrue.gateway.errors import raise_if_error
from tiktrue.node.peer_link import PeerLink
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.node_tls import NetworkCredentials


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
        raise_if_error(reply)
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
        return raise_if_error(reply)

    def _local_entry(self):
        server = self.local_server()
        if server is not None and server.node_id == self.entry_node_id and server.engine:
            return server
        return None
