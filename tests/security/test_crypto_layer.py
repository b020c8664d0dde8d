"""Mutual TLS 1.3 over 127.0.0.1 and AES-256-GCM block encryption, with real sockets and keys."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tiktrue.security.auth_manager import (
    CertInfo,
    NetworkCA,
    NodeIdentity,
    create_network_ca,
    generate_node_certificate,
    load_or_create_node_identity,
)
from tiktrue.security.crypto_layer import (
    BlockDecryptionError,
    client_ssl_context,
    decrypt_block_transfer,
    encrypt_block_transfer,
    new_block_key,
    peer_certificate_info,
    server_ssl_context,
)

HOST = "127.0.0.1"
TIMEOUT = 60.0  # a ceiling for a busy machine; a timeout is never taken for a refusal


@dataclass
class Node:
    identity: NodeIdentity
    cert_path: Path
    key_path: Path
    ca_path: Path


@dataclass
class Pki:
    ca: NetworkCA
    other_ca: NetworkCA
    server: Node
    client: Node
    foreign_client: Node  # certificate signed by another network's CA
    tmp: Path = field(default_factory=Path)


def _node(tmp: Path, name: str, ca: NetworkCA, role: str, hosts=(HOST, "localhost")) -> Node:
    identity = load_or_create_node_identity(tmp / name)
    cert_path = tmp / name / "node_cert.pem"
    cert_path.write_bytes(generate_node_certificate(ca, identity, role, hosts))
    return Node(identity, cert_path, identity.key_path, ca.directory / "ca_cert.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    ca = create_network_ca("net-a", tmp / "ca-a")
    other_ca = create_network_ca("net-b", tmp / "ca-b")
    return Pki(
        ca=ca,
        other_ca=other_ca,
        server=_node(tmp, "admin", ca, "admin"),
        client=_node(tmp, "worker", ca, "worker"),
        foreign_client=_node(tmp, "foreign", other_ca, "worker"),
        tmp=tmp,
    )


def _server_ctx(pki: Pki) -> ssl.SSLContext:
    n = pki.server
    return server_ssl_context(n.cert_path, n.key_path, n.ca_path)


def _client_ctx(node: Node, ca_path: Path) -> ssl.SSLContext:
    return client_ssl_context(node.cert_path, node.key_path, ca_path)


async def _exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """Serve once on 127.0.0.1:0; returns (client's reply or exception, peers the server saw)."""
    seen: list[CertInfo] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            info = peer_certificate_info(writer.get_extra_info("ssl_object"))
            seen.append(info)
            line = await reader.readline()
            writer.write(b"pong " + info.role.encode() + b" " + line)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:

        async def talk() -> bytes:
            reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx)
            try:
                writer.write(b"ping\n")
                await writer.drain()
                return await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            result: bytes | BaseException = await asyncio.wait_for(talk(), TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            result = exc
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    return result, seen


def _refused(result: bytes | BaseException, seen: list[CertInfo]) -> None:
    # TLS 1.3 lets the client finish its side before the server checks the client's certificate,
    # so a refused client sees the server's alert, or the connection closed or reset on its
    # first read; not a timeout, nor the client refusing the server.
    assert seen == [], "the server must never hand a refused connection to the application"
    if isinstance(result, ssl.SSLError):
        assert not isinstance(result, ssl.SSLCertVerificationError), result
        assert "ALERT" in (result.reason or "") or "PROTOCOL" in (result.reason or ""), result
    else:
        assert result == b"" or isinstance(result, ConnectionResetError), result


def test_contexts_are_tls13_mutual_and_trust_only_the_network_ca(pki: Pki) -> None:
    server = _server_ctx(pki)
    client = _client_ctx(pki.client, pki.client.ca_path)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        cas = ctx.get_ca_certs()
        assert len(cas) == 1 and ("organizationName", "net-a") in cas[0]["subject"][0]
    assert client.check_hostname


def test_same_network_client_connects_and_server_reads_role(pki: Pki) -> None:
    result, seen = asyncio.run(
        _exchange(_server_ctx(pki), _client_ctx(pki.client, pki.client.ca_path))
    )
    assert result == b"pong worker ping\n"
    assert len(seen) == 1
    assert seen[0].node_id == pki.client.identity.node_id
    assert (seen[0].role, seen[0].network_id) == ("worker", "net-a")


def test_in_memory_pem_accepted(pki: Pki) -> None:
    s, c = pki.server, pki.client
    server = server_ssl_context(
        s.cert_path.read_bytes(), s.identity.private_key_pem(), pki.ca.cert_pem
    )
    client = client_ssl_context(
        c.cert_path.read_bytes(), c.identity.private_key_pem(), pki.ca.cert_pem
    )
    result, seen = asyncio.run(_exchange(server, client))
    assert result == b"pong worker ping\n" and seen[0].role == "worker"


def test_client_without_certificate_refused(pki: Pki) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.load_verify_locations(cafile=str(pki.client.ca_path))
    _refused(*asyncio.run(_exchange(_server_ctx(pki), bare)))


def test_client_from_other_network_ca_refused(pki: Pki) -> None:
    # The foreign client even trusts our CA; its own certificate is what gets it refused.
    client = _client_ctx(pki.foreign_client, pki.client.ca_path)
    _refused(*asyncio.run(_exchange(_server_ctx(pki), client)))


def test_client_refuses_server_from_other_network_ca(pki: Pki) -> None:
    client = _client_ctx(pki.foreign_client, pki.foreign_client.ca_path)
    result, seen = asyncio.run(_exchange(_server_ctx(pki), client))
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert seen == []


def test_client_checks_server_host_name(pki: Pki) -> None:
    elsewhere = _node(pki.tmp, "elsewhere", pki.ca, "admin", hosts=("10.9.8.7", "node-x.lan"))
    server = server_ssl_context(elsewhere.cert_path, elsewhere.key_path, elsewhere.ca_path)
    result, seen = asyncio.run(_exchange(server, _client_ctx(pki.client, pki.client.ca_path)))
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert seen == []


def test_tls12_client_refused(pki: Pki) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.load_cert_chain(str(pki.client.cert_path), str(pki.client.key_path))
    client.load_verify_locations(cafile=str(pki.client.ca_path))
    # A protocol_version alert (ssl.SSLError) or, when the server aborts first, a reset.
    _refused(*asyncio.run(_exchange(_server_ctx(pki), client)))


# --- AES-256-GCM -----------------------------------------------------------------------------


def test_block_round_trip() -> None:
    key = new_block_key()
    assert len(key) == 32 and key != new_block_key()
    data = bytes(range(256)) * 100
    blob = encrypt_block_transfer(data, key, b"model/block_3")
    assert len(blob) == 12 + len(data) + 16
    assert data not in blob
    assert encrypt_block_transfer(data, key, b"model/block_3") != blob  # fresh nonce each time
    assert decrypt_block_transfer(blob, key, b"model/block_3") == data
    assert decrypt_block_transfer(encrypt_block_transfer(b"", key), key) == b""


@pytest.mark.parametrize("index", [0, 12, -1])
def test_flipped_byte_refused(index: int) -> None:
    key = new_block_key()
    blob = bytearray(encrypt_block_transfer(b"weights" * 50, key))
    blob[index] ^= 0x80
    with pytest.raises(BlockDecryptionError, match="tampered"):
        decrypt_block_transfer(bytes(blob), key)


def test_wrong_key_or_associated_data_refused() -> None:
    key = new_block_key()
    blob = encrypt_block_transfer(b"weights", key, b"block_1")
    with pytest.raises(BlockDecryptionError):
        decrypt_block_transfer(blob, new_block_key(), b"block_1")
    with pytest.raises(BlockDecryptionError):
        decrypt_block_transfer(blob, key, b"block_2")
    with pytest.raises(BlockDecryptionError, match="too short"):
        decrypt_block_transfer(blob[:20], key, b"block_1")


def test_key_must_be_256_bits() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_block_transfer(b"x", b"k" * 16)
