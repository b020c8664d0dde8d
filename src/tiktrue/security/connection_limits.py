"""What a caller that proves nothing can cost a node: per-source caps on its listening ports.

A node's ports are on the LAN, and anyone there can connect. The expensive part of a
connection is the TLS handshake (key exchange and a signature, on the event loop that also
serves heartbeats and forwards tokens), then what an unproved caller may ask (who the node is,
the join handshake). Measured before these caps: six loops of certificate-less ``node_info``
made a 32-token chat 3-5x slower (``bench/flood.py``). So, per source address:

- **before the TLS handshake** (at accept, nothing read yet): a source with
  ``MAX_CONNECTIONS_PER_SOURCE`` connections open has any more closed at once; new handshakes
  are paced to ``HANDSHAKES_PER_SOURCE_S`` (a burst of ``HANDSHAKE_BURST``), in arrival order,
  and one that would wait longer than ``MAX_HANDSHAKE_WAIT_S`` is closed at once;
- **right after it**: a connection that showed no certificate counts against
  ``MAX_CERTLESS_PER_SOURCE`` (more are closed at once), and its requests are paced to
  ``CERTLESS_REQUESTS_PER_SOURCE_S`` per source (``certless_turn``), until it proves a key;
- in all, at most ``MAX_UNPROVED_CONNECTIONS`` connections wait for their handshake or have
  shown no certificate, whatever their source.

Members (a network certificate, verified by TLS) are held only by the first two caps, sized
far above what a node's own traffic needs; a member behind the same address as a flood (NAT,
or a flood from a member's own PC) waits its turn for a handshake, but is never refused by the
flood's cert-less connections. What this does not stop: a flood spread over many addresses
(each within its caps; ``MAX_UNPROVED_CONNECTIONS`` bounds their number, not the handshakes
they cost), SYN floods and floods of bandwidth (the OS and the network's job), a forged source
address (TCP's handshake makes that hard on a LAN; not impossible). See docs/SECURITY.md.

``serve`` wraps ``websockets.asyncio.server.serve`` so that every accepted socket goes through
a ``SourceLimiter`` before TLS starts: any WebSocket server of the node can use it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as websockets_serve

from tiktrue import limits

log = logging.getLogger("tiktrue.connection_limits")
PRUNE_OVER = 1024  # sources remembered before the idle ones are forgotten


class Refused(Exception):
    """A connection over a cap: closed without a word (it proved nothing to answer)."""


class Pace:
    """At most ``rate`` turns a second on average and ``burst`` at once; callers beyond wait
    their turn, in the order they came (the generic cell rate algorithm: no timer, no
    polling; each caller is told how long to wait)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval
        self.tat = float("-inf")  # the theoretical arrival time of the next turn

    def reserve(self, now: float, most_wait: float) -> float | None:
        """The wait before this caller's turn, its turn reserved; None (nothing reserved)
        when it would wait longer than ``most_wait``."""
        tat = max(self.tat, now)
        wait = max(0.0, tat - self.tolerance - now)
        if wait > most_wait:
            return None
        self.tat = tat + self.interval
        return wait

    def idle(self, now: float) -> bool:
        """No turn reserved ahead: forgetting this pace changes nothing."""
        return self.tat <= now


@dataclass
class _Source:
    open: int = 0  # connections accepted and not closed
    certless: int = 0  # of which shown no certificate in TLS and not proved since
    handshakes: Pace = field(default_factory=lambda: Pace(1.0, 1))
    requests: Pace = field(default_factory=lambda: Pace(1.0, 1))


WAITING, CERTLESS, PROVED, RELEASED = "waiting", "certless", "proved", "released"


@dataclass(eq=False)
class Ticket:
    """One accepted connection's place in its source's counts: ``waiting`` for its TLS
    handshake, ``certless`` after it (no certificate shown), ``proved`` (a certificate, or a
    key proved since), ``released`` (closed)."""

    source: str
    state: str = WAITING


class SourceLimiter:
    """The per-source counts of one listening port (see the module's docstring). ``clock``:
    seconds, monotonic (a test's own)."""

    def __init__(
        self,
        *,
        max_connections: int = limits.MAX_CONNECTIONS_PER_SOURCE,
        handshakes_per_s: float = limits.HANDSHAKES_PER_SOURCE_S,
        handshake_burst: int = limits.HANDSHAKE_BURST,
        max_handshake_wait: float = limits.MAX_HANDSHAKE_WAIT_S,
        max_certless: int = limits.MAX_CERTLESS_PER_SOURCE,
        certless_requests_per_s: float = limits.CERTLESS_REQUESTS_PER_SOURCE_S,
        certless_request_burst: int = limits.CERTLESS_REQUEST_BURST,
        max_unproved: int = limits.MAX_UNPROVED_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.handshakes_per_s, self.handshake_burst = handshakes_per_s, handshake_burst
        self.max_handshake_wait = max_handshake_wait
        self.max_certless = max_certless
        self.requests_per_s, self.request_burst = certless_requests_per_s, certless_request_burst
        self.max_unproved = max_unproved
        self.clock = clock
        self.sources: dict[str, _Source] = {}
        self.unproved = 0  # waiting for their handshake, or shown no certificate
        self.refused = 0  # connections closed by a cap (for the logs and the bench)
        self._refusals: dict[str, int] = {}  # the same, per reason
        self._pending: set[asyncio.Task] = set()

    def _source(self, source: str) -> _Source:
        state = self.sources.get(source)
        if state is None:
            state = self.sources[source] = _Source(
                handshakes=Pace(self.handshakes_per_s, self.handshake_burst),
                requests=Pace(self.requests_per_s, self.request_burst),
            )
        return state

    def admit(self, source: str) -> Ticket | None:
        """At accept, before anything is read: a ticket, or None (close it now)."""
        if len(self.sources) > PRUNE_OVER:
            self._prune()
        state = self._source(source)
        if state.open >= self.max_connections or self.unproved >= self.max_unproved:
            self._refuse(source, "too many connections")
            return None
        state.open += 1
        self.unproved += 1
        return Ticket(source)

    async def handshake_turn(self, ticket: Ticket) -> None:
        """Wait for this connection's turn to start TLS; raises ``Refused`` (close it) when
        its source has queued more than it may wait."""
        wait = self._source(ticket.source).handshakes.reserve(self.clock(), self.max_handshake_wait)
        if wait is None:
            self._refuse(ticket.source, "too many handshakes")
            raise Refused(ticket.source)
        if wait > 0:
            await asyncio.sleep(wait)

    def handshake_done(self, ticket: Ticket, *, certificate: bool) -> bool:
        """Right after TLS: a connection that showed a certificate (TLS verified it against
        a network's CA) is no longer unproved; one without counts against its source's
        cert-less cap. False: over the cap (close it)."""
        state = self._source(ticket.source)
        if ticket.state != WAITING:
            return ticket.state != RELEASED
        if certificate:
            ticket.state = PROVED
            self.unproved -= 1
            return True
        if state.certless >= self.max_certless:
            self._refuse(ticket.source, "too many connections without a certificate")
            return False
        state.certless += 1
        ticket.state = CERTLESS
        return True

    def proved(self, ticket: Ticket) -> None:
        """The connection proved a key after all (this node's owner, a member answering the
        challenge): its requests are no longer paced, and it leaves the cert-less counts."""
        if ticket.state == CERTLESS:
            ticket.state = PROVED
            self._source(ticket.source).certless -= 1
            self.unproved -= 1

    async def certless_turn(self, ticket: Ticket) -> None:
        """Before answering a request of a connection that proved nothing: its source's
        turn (waits; a flood on kept-open connections is slowed to the rate, and stops being
        read once websockets' queue is full)."""
        wait = self._source(ticket.source).requests.reserve(self.clock(), float("inf"))
        if wait:
            await asyncio.sleep(wait)

    def release(self, ticket: Ticket) -> None:
        """The connection closed (or never got past its handshake). Idempotent."""
        if ticket.state == RELEASED:
            return
        state = self._source(ticket.source)
        state.open -= 1
        if ticket.state == CERTLESS:
            state.certless -= 1
        if ticket.state in (WAITING, CERTLESS):
            self.unproved -= 1
        ticket.state = RELEASED
        now = self.clock()
        if state.open == 0 and state.handshakes.idle(now) and state.requests.idle(now):
            del self.sources[ticket.source]  # nothing to remember: the table stays small

    def _prune(self) -> None:
        """Forget the sources with nothing open and no turn reserved ahead."""
        now = self.clock()
        for source, state in list(self.sources.items()):
            if state.open == 0 and state.handshakes.idle(now) and state.requests.idle(now):
                del self.sources[source]

    def _refuse(self, source: str, why: str) -> None:
        self.refused += 1
        count = self._refusals[why] = self._refusals.get(why, 0) + 1
        if count % 100 == 1:  # the first, then every 100th: a flood would fill the log
            log.warning("closed a connection from %s: %s (%d so far)", source, why, count)

    def track(self, task: asyncio.Task) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def close(self) -> None:
        """The server stops: connections still before their handshake are dropped."""
        for task in list(self._pending):
            task.cancel()


class _Handover(asyncio.Protocol):
    """The protocol under TLS until the connection is handed to its WebSocket protocol: it
    keeps what arrives before that (a client sends its upgrade request right behind its
    TLS finish), then passes everything on, and tells the limiter when the connection ends."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.target: asyncio.Protocol | None = None
        self.on_lost = on_lost
        self._early: list[tuple[str, Any]] = []

    def hand_over(self, target: asyncio.Protocol, transport: asyncio.BaseTransport) -> None:
        self.target = target
        target.connection_made(transport)
        early, self._early = self._early, []
        for event, arg in early:
            getattr(self, event)(*arg)

    def data_received(self, data: bytes) -> None:
        if self.target is None:
            self._early.append(("data_received", (data,)))
        else:
            self.target.data_received(data)

    def eof_received(self) -> bool | None:
        if self.target is None:
            self._early.append(("eof_received", ()))
            return None
        return self.target.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()
        if self.target is None:
            self._early.append(("connection_lost", (exc,)))
        else:
            self.target.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.target is not None:
            self.target.pause_writing()

    def resume_writing(self) -> None:
        if self.target is not None:
            self.target.resume_writing()


class _Gate(asyncio.Protocol):
    """What asyncio sees of an accepted socket: the limiter's checks, then TLS, then the
    WebSocket connection that websockets made for it."""

    def __init__(
        self,
        connection: ServerConnection,
        limiter: SourceLimiter,
        context: ssl.SSLContext,
        handshake_timeout: float,
    ) -> None:
        self.connection = connection
        self.limiter = limiter
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.ticket: Ticket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ticket = self.limiter.admit(str(peer[0]) if peer else "unknown")
        if ticket is None:
            transport.abort()  # over its source's cap: closed before any TLS work
            return
        transport.pause_reading()  # nothing is read until its turn
        self.ticket = ticket
        self.connection.limiter_ticket = ticket  # the server's handler reads it
        task = asyncio.get_running_loop().create_task(self._open(transport, ticket))
        self.limiter.track(task)

    def data_received(self, data: bytes) -> None:  # reading is paused: not called
        pass

    def connection_lost(self, exc: Exception | None) -> None:  # before TLS took the socket
        if self.ticket is not None:
            self.limiter.release(self.ticket)

    async def _open(self, transport: asyncio.BaseTransport, ticket: Ticket) -> None:
        loop = asyncio.get_running_loop()
        handover = _Handover(lambda: self.limiter.release(ticket))
        try:
            await self.limiter.handshake_turn(ticket)
            if transport.is_closing():
                raise Refused(ticket.source)
            tls = await loop.start_tls(
                transport,
                handover,
                self.context,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
            certificate = tls.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if not self.limiter.handshake_done(ticket, certificate=bool(certificate)):
                tls.abort()
                return
            handover.hand_over(self.connection, tls)
        except asyncio.CancelledError:
            transport.abort()
            self.limiter.release(ticket)
            raise
        except (Refused, OSError, ssl.SSLError, EOFError, asyncio.TimeoutError, RuntimeError):
            transport.abort()  # over a cap, a failed or timed-out handshake, closed meanwhile
            self.limiter.release(ticket)


def serve(handler, host: str, port: int, *, ssl_context: ssl.SSLContext, limiter, **kwargs):
    """``websockets.asyncio.server.serve(handler, host, port, ssl=ssl_context, **kwargs)``,
    with every accepted socket checked by ``limiter`` before its TLS handshake and right
    after it. In ``handler``, ``connection.limiter_ticket`` is the connection's ticket (for
    ``certless_turn`` and ``proved``)."""
    handshake_timeout = kwargs.pop("open_timeout", 10.0)

    def create_connection(protocol, server, **options) -> Any:
        connection = ServerConnection(protocol, server, **options)
        return _Gate(connection, limiter, ssl_context, handshake_timeout)

    return websockets_serve(
        handler,
        host,
        port,
        create_connection=create_connection,
        open_timeout=handshake_timeout,
        **kwargs,
    )
