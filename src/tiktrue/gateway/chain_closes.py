"""Freeing sessions on a chain's nodes, and not forgetting one: a close the chain misses (a
node unreachable, or silent for ``CLOSE_TIMEOUT_S``) is remembered and sent again once the
chain answers again (a step gets through, or a new chain is in use), so no node keeps a
session nobody will free."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tiktrue.gateway.errors import ChainError
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol import protocol_spec as ps

log = logging.getLogger("tiktrue.gateway")

CLOSE_TIMEOUT_S = 10.0  # freeing a session on the nodes: a hung node must not hold the caller

Route = tuple[str, ...] | None  # a replica chain's node ids (None: the main chain)
# await send(kind, session_id, route): a control message along that chain; raises its error
Send = Callable[..., Awaitable[dict]]


class ChainCloses:
    """Sends the closes; ``in_use(session_id)``: the session runs again (its next step opens
    it afresh), so a missed close of it is dropped; ``replicas()``: the replica chains now."""

    def __init__(
        self,
        send: Send,
        in_use: Callable[[str], bool],
        replicas: Callable[[], list[tuple[str, ...]]],
    ) -> None:
        self._send = send
        self._in_use = in_use
        self._replicas = replicas
        self._missed: dict[str, Route] = {}  # closes the chain missed (their routes)
        self._retrying: asyncio.Task | None = None

    async def close(self, session_id: str, route: Route) -> None:
        """Free the session on every node of the chain ``route`` (remembered if missed)."""
        try:
            await asyncio.wait_for(
                self._send(ps.SessionClose, session_id, route=route), CLOSE_TIMEOUT_S
            )
        except (ChainError, PeerUnavailable, asyncio.TimeoutError) as exc:
            log.info("session %s: close missed the chain (%s); sent again later", session_id, exc)
            self._missed[session_id] = route
        else:
            self._missed.pop(session_id, None)

    def retry(self) -> None:
        """The chain answers again: send what it missed (in the background, once at a time).
        Called for every step: a dict's truth test when nothing was missed."""
        if self._missed and (self._retrying is None or self._retrying.done()):
            self._retrying = asyncio.get_running_loop().create_task(self._send_missed())

    async def _send_missed(self) -> None:
        for session_id, route in list(self._missed.items()):
            if self._in_use(session_id):
                self._missed.pop(session_id, None)
            else:
                await self.close(session_id, route if route in self._replicas() else None)

    async def aclose(self) -> None:
        """Stop sending (the nodes drop what they held when their links close)."""
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
