"""The challenge bound to a TLS session: tls-unique under TLS 1.3 with OpenSSL, and the
answers' checks (replay, relay, reflection)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import websockets

from tiktrue.security.auth_manager import (
    IdentityError,
    NetworkCA,
    create_network_ca,
    load_or_create_node_identity,
)
from tiktrue.security.crypto_layer import client_ssl_context, server_ssl_context
from tiktrue.security.link_auth import LinkChallenge, parse_nonce, session_binding
from tiktrue.security.node_tls import pem_to_der

NET = "net-l"


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> NetworkCA:
    return create_network_ca(NET, tmp_path_factory.mktemp("ca"))


def _member(ca: NetworkCA, base: Path, name: str, role: str = "worker"):
    identity = load_or_create_node_identity(base / name)
    cert = base / f"{name}.pem"
    cert.write_bytes(ca.generate_node_certificate(identity.node_id, identity.public_key, role))
    return identity, cert


def test_tls_unique_is_the_same_at_both_ends_and_new_on_each_connection(ca, tmp_path):
    """What the binding rests on: under TLS 1.3 (OpenSSL 3) both ends read the same
    tls-unique value, and every connection has its own."""
    server_id, server_cert = _member(ca, tmp_path, "server")
    client_id, client_cert = _member(ca, tmp_path, "client")
    ca_path = ca.directory / "ca_cert.pem"
    seen: dict[str, list] = {"server": [], "client": []}
    bindings: dict[str, list] = {"server": [], "client": []}
    server_der, client_der = (
        pem_to_der(server_cert.read_bytes()),
        pem_to_der(client_cert.read_bytes()),
    )

    async def handler(ws):
        tls = ws.transport.get_extra_info("ssl_object")
        seen["server"].append(tls.get_channel_binding("tls-unique"))
        bindings["server"].append(
            session_binding(tls, purpose="test", own_cert=server_der, server=True)
        )
        await ws.send(tls.version())

    async def go():
        context = server_ssl_context(server_cert, server_id.key_path, ca_path)
        async with websockets.serve(handler, "127.0.0.1", 0, ssl=context) as server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(2):
                client = client_ssl_context(client_cert, client_id.key_path, ca_path)
                async with websockets.connect(f"wss://127.0.0.1:{port}", ssl=client) as ws:
                    tls = ws.transport.get_extra_info("ssl_object")
                    assert await ws.recv() == "TLSv1.3"
                    seen["client"].append(tls.get_channel_binding("tls-unique"))
                    bindings["client"].append(
                        session_binding(tls, purpose="test", own_cert=client_der, server=False)
                    )

    asyncio.run(go())
    assert seen["server"] == seen["client"] and all(len(v) >= 12 for v in seen["client"])
    assert seen["client"][0] != seen["client"][1]
    assert bindings["server"] == bindings["client"]
    assert bindings["client"][0] != bindings["client"][1]


def _pair(binding_client: bytes, binding_server: bytes):
    client, server = (
        LinkChallenge(binding_client, "client"),
        LinkChallenge(binding_server, "server"),
    )
    client.peer_nonce, server.peer_nonce = server.nonce, client.nonce
    return client, server


def test_answers_verify_once_and_only_for_their_session_and_side(ca, tmp_path):
    identity, cert = _member(ca, tmp_path, "a")
    der = pem_to_der(cert.read_bytes())
    client, server = _pair(b"session-1", b"session-1")
    answer = client.answer(identity)
    assert server.check_member(der, ca.cert_pem, answer).node_id == identity.node_id
    with pytest.raises(IdentityError, match="answered already"):  # one try per connection
        server.check_member(der, ca.cert_pem, answer)

    # replayed on another connection (its own nonce and session): refused
    _, other = _pair(b"session-2", b"session-2")
    other.peer_nonce = client.nonce
    with pytest.raises(IdentityError, match="does not verify"):
        other.check_member(der, ca.cert_pem, answer)

    # relayed: made for the same nonces but in another TLS session
    client, server = _pair(b"leg-1", b"leg-2")
    with pytest.raises(IdentityError, match="does not verify"):
        server.check_member(der, ca.cert_pem, client.answer(identity))

    # reflected: the server's own answer sent back to it as the client's
    client, server = _pair(b"session-3", b"session-3")
    mirror = LinkChallenge(b"session-3", "server", nonce=client.nonce)
    mirror.peer_nonce = server.nonce
    with pytest.raises(IdentityError, match="does not verify"):
        server.check_member(der, ca.cert_pem, mirror.answer(identity))

    # revoked: a right answer from a removed node
    client, server = _pair(b"session-4", b"session-4")
    with pytest.raises(IdentityError, match="was removed"):
        server.check_member(der, ca.cert_pem, client.answer(identity), revoked={identity.node_id})


def test_bare_keys_and_bad_nonces(tmp_path):
    owner = load_or_create_node_identity(tmp_path / "owner")
    stranger = load_or_create_node_identity(tmp_path / "stranger")
    client, server = _pair(b"s", b"s")
    assert server.check_key(owner.public_key, client.answer(owner)) == owner.node_id
    client, server = _pair(b"s", b"s")
    with pytest.raises(IdentityError, match="another connection"):
        server.check_key(owner.public_key, client.answer(stranger))
    for bad in (None, "zz", "00" * 8, "00" * 65, 5):
        with pytest.raises(IdentityError, match="nonce"):
            parse_nonce(bad)
