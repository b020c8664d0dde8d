"""Per-source caps on a listening port: the counts (a fake clock), and a real TLS WebSocket
server behind them: a source over its connection cap is closed before any TLS byte, one over
its cap of certificate-less connections right after the handshake, while a connection with a
certificate from the same source still gets in."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tiktrue.security.connection_limits import (
    CERTLESS,
    PROVED,
    WAITING,
    Pace,
    SourceLimiter,
    serve,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_pace_lets_a_burst_through_then_spaces_callers_in_order():
    pace = Pace(rate=10.0, burst=3)
    waits = [pace.reserve(0.0, most_wait=1.0) for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.1) and waits[4] == pytest.approx(0.2)
    assert pace.reserve(0.0, most_wait=0.25) is None  # would wait 0.3 s: refused ...
    assert pace.reserve(0.0, most_wait=1.0) == pytest.approx(0.3)  # ... and reserved nothing
    assert not pace.idle(0.0) and pace.idle(10.0)
    assert pace.reserve(10.0, most_wait=0.0) == 0.0  # quiet for long: a burst again


def test_the_counts_of_one_source():
    clock = Clock()
    limiter = SourceLimiter(max_connections=3, max_certless=1, max_unproved=10, clock=clock)
    tickets = [limiter.admit("10.0.0.9") for _ in range(3)]
    assert all(t.state == WAITING for t in tickets) and limiter.unproved == 3
    assert limiter.admit("10.0.0.9") is None  # its fourth: closed at accept
    assert limiter.admit("10.0.0.7") is not None  # another source has its own count
    a, b, c = tickets
    assert limiter.handshake_done(a, certificate=False) and a.state == CERTLESS
    assert not limiter.handshake_done(b, certificate=False)  # a second one without: closed
    assert limiter.handshake_done(c, certificate=True) and c.state == PROVED
    assert limiter.refused == 2 and limiter.unproved == 3  # a (cert-less), b, and 10.0.0.7's
    limiter.proved(a)  # the owner answered the challenge: no longer cert-less
    assert limiter.sources["10.0.0.9"].certless == 0 and limiter.unproved == 2
    for ticket in tickets + [b]:
        limiter.release(ticket)  # twice for b: counted once
    assert "10.0.0.9" not in limiter.sources  # nothing left to remember of it
    assert limiter.unproved == 1


def test_unproved_connections_are_capped_over_all_sources():
    limiter = SourceLimiter(max_unproved=2, clock=Clock())
    first = limiter.admit("10.0.0.1")
    assert limiter.admit("10.0.0.2") is not None
    assert limiter.admit("10.0.0.3") is None
    limiter.handshake_done(first, certificate=True)  # a member: no longer unproved
    assert limiter.admit("10.0.0.3") is not None


# --- a real server -------------------------------------------------------------------------


def _certificate(name: str, key, issuer=None, issuer_key=None, *, ca: bool = False):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(server context asking for an optional client certificate of the CA, client context
    without a certificate, client context with one)."""
    folder = tmp_path_factory.mktemp("tls")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("ca", ca_key, ca=True)

    def issue(name: str) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca.subject, ca_key)
        cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(pem))
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cert_path, key_path

    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(*issue("server"))
    server.load_verify_locations(folder / "ca.pem")
    server.verify_mode = ssl.CERT_OPTIONAL

    def client(with_cert: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(folder / "ca.pem")
        context.check_hostname = False
        if with_cert:
            context.load_cert_chain(*issue("member"))
        return context

    return server, client(False), client(True)


async def _echo(connection) -> None:
    async for message in connection:
        await connection.send(message)


async def _talk(port: int, context: ssl.SSLContext, source: str = "127.0.0.2"):
    """A WebSocket client from ``source``; its answer to one message, or what failed."""
    try:
        async with websockets.connect(
            f"wss://127.0.0.1:{port}", ssl=context, local_addr=(source, 0), open_timeout=60
        ) as ws:
            await ws.send("ping")
            return await asyncio.wait_for(ws.recv(), 60)
    except (OSError, ssl.SSLError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
        return exc


def test_a_source_over_its_connection_cap_is_closed_before_tls(tls):
    server_context, certless, _ = tls
    limiter = SourceLimiter(max_connections=2)

    async def go():
        async with serve(
            _echo, "127.0.0.1", 0, ssl_context=server_context, limiter=limiter
        ) as server:
            port = server.sockets[0].getsockname()[1]
            held = [
                await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
                for _ in range(2)
            ]  # two raw sockets that never start TLS: the source's cap
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.2", 0)
            )
            closed = await asyncio.wait_for(reader.read(1), 60)  # EOF: nothing was sent
            writer.close()
            other = await _talk(port, certless, source="127.0.0.3")  # another source
            for _, w in held:
                w.close()
            return closed, other, limiter.refused

    closed, other, refused = asyncio.run(go())
    assert closed == b"" and refused == 1
    assert other == "ping"


def test_certless_connections_are_capped_right_after_the_handshake(tls):
    server_context, certless, member = tls
    limiter = SourceLimiter(max_certless=1)

    async def go():
        async with serve(
            _echo, "127.0.0.1", 0, ssl_context=server_context, limiter=limiter
        ) as server:
            port = server.sockets[0].getsockname()[1]
            first = await websockets.connect(
                f"wss://127.0.0.1:{port}", ssl=certless, local_addr=("127.0.0.2", 0)
            )
            second = await _talk(port, certless)  # the same source, no certificate: closed
            with_cert = await _talk(port, member)  # the same source, a certificate: served
            await first.send("still here")
            kept = await first.recv()
            await first.close()
            return second, with_cert, kept

    second, with_cert, kept = asyncio.run(go())
    assert isinstance(second, Exception), second
    assert with_cert == "ping" and kept == "still here"
    assert limiter.refused == 1
    counts = [(s.open, s.certless) for s in limiter.sources.values()]
    assert limiter.unproved == 0 and set(counts) <= {(0, 0)}  # nothing counted once closed
