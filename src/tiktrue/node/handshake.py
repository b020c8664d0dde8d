"""The challenge on a block link (``security.link_auth``), both sides, once per connection.

``hello`` carries the connecting node's nonce; ``hello_reply`` the server's nonce and its
answer; ``node_auth`` the connecting node's answer, acknowledged with ``ack``. Only then does
the server read steps from the connection. Each side checks the other's certificate against
the network's CA, its answer against this TLS session, and the network's revocation list.
Nothing of this runs per message: the per-token path starts after it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection

import websockets

from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.auth_manager import CertInfo, IdentityError
from tiktrue.security.link_auth import LinkChallenge, parse_nonce, parse_proof, session_binding
from tiktrue.security.node_tls import NetworkCredentials

HELLO_TIMEOUT = 10.0  # a new connection says hello within this, or is closed
HANDSHAKE_TIMEOUT = 10.0
MAX_AUTH_BYTES = 4096


def _challenge(ws, credentials: NetworkCredentials, network_id: str, *, server: bool):
    ssl_object = ws.transport.get_extra_info("ssl_object")
    binding = session_binding(
        ssl_object, purpose=f"block:{network_id}", own_cert=credentials.cert_der, server=server
    )
    return LinkChallenge(binding, "server" if server else "client"), ssl_object


def _refused(message: str, message_id: str | None = None) -> ps.ProtocolError:
    return ps.ProtocolError(ps.AUTH_FAILED, message, message_id)


async def offer(
    ws,
    hello: ps.Hello,
    credentials: NetworkCredentials,
    *,
    expected_node_id: str | None = None,
    revoked: Collection[str] = (),
) -> dict:
    """The connecting side: say hello with a challenge, check the server's answer (and that
    it is ``expected_node_id``), answer its challenge. Returns the hello_reply; raises
    ``ProtocolError`` (its error, or ``auth_failed``) when the link cannot be trusted."""
    challenge, ssl_object = _challenge(ws, credentials, hello.network_id, server=False)
    hello = hello.model_copy(update={"auth_nonce": challenge.nonce.hex()})
    await ws.send(ps.make_message(hello))
    reply = json.loads(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT))
    if reply.get("header", {}).get("message_type") == "error":
        raise ps.ProtocolError(reply.get("code", "error"), reply.get("message", ""))
    try:
        challenge.peer_nonce = parse_nonce(reply.get("auth_nonce"))
        info = challenge.check_member(
            ssl_object.getpeercert(binary_form=True),
            credentials.ca_pem,
            parse_proof(reply.get("auth_proof")),
            revoked=revoked,
        )
    except IdentityError as exc:
        raise _refused(f"the server's answer to the challenge: {exc}") from exc
    if expected_node_id is not None and info.node_id != expected_node_id:
        raise _refused(f"the server is node {info.node_id}, not {expected_node_id}")
    proof = ps.NodeAuth(proof=challenge.answer(credentials.identity).hex())
    await ws.send(ps.make_message(proof))
    ack = json.loads(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT))
    if ack.get("header", {}).get("message_type") != "ack":
        raise ps.ProtocolError(ack.get("code", ps.AUTH_FAILED), ack.get("message", str(ack)))
    return reply


async def accept(
    ws,
    hello: ps.Hello,
    credentials: NetworkCredentials,
    *,
    revoked: Collection[str] = (),
) -> CertInfo:
    """The serving side, after its own checks of ``hello``: answer the peer's challenge, send
    ours, check the answer. Returns the peer's verified certificate; raises ``ProtocolError``
    (``auth_failed``) for a peer that cannot be trusted (the caller answers and closes)."""
    challenge, ssl_object = _challenge(ws, credentials, hello.network_id, server=True)
    try:
        challenge.peer_nonce = parse_nonce(hello.auth_nonce)
    except IdentityError as exc:
        raise _refused(f"hello carries no challenge: {exc}", hello.message_id) from exc
    reply = ps.HelloReply(
        node_id=credentials.identity.node_id,
        network_id=hello.network_id,
        in_reply_to=hello.message_id,
        auth_nonce=challenge.nonce.hex(),
        auth_proof=challenge.answer(credentials.identity).hex(),
    )
    await ws.send(ps.make_message(reply))
    parsed = ps.parse_message(
        await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), max_bytes=MAX_AUTH_BYTES
    )
    if not isinstance(parsed.message, ps.NodeAuth):
        raise _refused("the message after hello_reply must be node_auth", parsed.message_id)
    try:
        info = challenge.check_member(
            ssl_object.getpeercert(binary_form=True),
            credentials.ca_pem,
            parse_proof(parsed.message.proof),
            revoked=revoked,
        )
    except IdentityError as exc:
        raise _refused(str(exc), parsed.message_id) from exc
    if info.node_id != hello.node_id:
        raise _refused(
            f"hello names node {hello.node_id}, the certificate {info.node_id}", hello.message_id
        )
    ack = ps.Ack(in_reply_to=parsed.message_id, network_id=hello.network_id, detail=info.role)
    await ws.send(ps.make_message(ack))
    return info


async def greet(
    ws, network_id: str, credentials: NetworkCredentials, *, revoked: Collection[str] = ()
) -> tuple[ps.Hello, CertInfo] | None:
    """The serving side of a new connection: the peer's hello (its network and versions
    checked), then the challenge both ways. The hello and the peer's certificate; None when
    the peer is refused (it got an ``error`` naming why, and the connection is closed)."""
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
        if hello.network_id != network_id:
            raise ps.ProtocolError(
                ps.WRONG_NETWORK,
                f"this server belongs to network {network_id}, not {hello.network_id}",
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
        peer = await accept(ws, hello, credentials, revoked=revoked)
    except ps.ProtocolError as exc:
        await ws.send(json.dumps(ps.error_reply(exc, network_id=network_id)))
        await ws.close(1008, exc.code)
        return None
    except (asyncio.TimeoutError, websockets.ConnectionClosed):
        await ws.close(1008, "no hello")
        return None
    return hello, peer
