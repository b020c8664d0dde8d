"""Who may do what on a node's control channel (in this process; the whole table over real
TLS is walked in tests/integration/test_node_security.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers.network import accept
from tiktrue.control import join as joining
from tiktrue.control import network_manager as nm
from tiktrue.model.store import MANIFEST, BlockStore, chunk_aad
from tiktrue.protocol.frames import encode_bytes_frame
from tiktrue.protocol.network_config import NetworkConfig, write_config
from tiktrue.security.access_control import AccessDenied, Caller, check_control
from tiktrue.security.auth_manager import IdentityError, certificate_info, create_network_ca
from tiktrue.security.crypto_layer import encrypt_block_transfer
from tiktrue.security.link_auth import LinkChallenge
from tiktrue.security.node_tls import block_keyring, node_identity
from tiktrue.service.control_server import Connection, ControlServer


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def server_for(home) -> ControlServer:
    return ControlServer(SimpleNamespace(data_dir=home, identity=node_identity(home)))


def member(pem: bytes) -> Connection:
    """A connection that proved ``pem`` (the in-process tests skip the TLS challenge)."""
    return Connection(None, "127.0.0.1", der(pem), Caller.member(certificate_info(pem)))


def proved(server, cert_pem: bytes, signer) -> object:
    """``server``'s check of a challenge that ``signer`` answered for ``cert_pem``."""
    theirs, ours = LinkChallenge(b"binding", "client"), LinkChallenge(b"binding", "server")
    theirs.peer_nonce, ours.peer_nonce = ours.nonce, theirs.nonce
    conn = Connection(None, "127.0.0.1", der(cert_pem))
    return server._check_member(conn, ours, theirs.answer(signer))


def test_only_this_networks_ca_can_speak_for_it(tiny_llama, tmp_path):
    home = tmp_path / "node"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    server = server_for(home)
    admin = (home / "networks" / "net-a" / "node_cert.pem").read_bytes()
    assert proved(server, admin, node_identity(home)).role == "admin"

    # another network's admin forges a certificate that names net-a, and answers with its key
    evil_ca = create_network_ca("net-a", tmp_path / "evil-ca")
    intruder = node_identity(tmp_path / "intruder")
    forged = evil_ca.generate_node_certificate(intruder.node_id, intruder.public_key, "admin")
    with pytest.raises(IdentityError, match="not by this network's CA|does not verify"):
        proved(server, forged, intruder)
    with pytest.raises(IdentityError, match="does not verify"):  # the right cert, another key
        proved(server, admin, intruder)
    other = tmp_path / "other"
    nm.create_network(other, "B", tiny_llama, network_id="net-b")  # a network it is not in
    with pytest.raises(IdentityError, match="not in network net-b"):
        proved(server, (other / "networks/net-b/node_cert.pem").read_bytes(), node_identity(other))


def test_a_worker_certificate_is_not_an_admin(tiny_llama, tmp_path):
    home = tmp_path / "admin"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    worker = tmp_path / "worker"
    secret = joining.parse_token(joining.create_join_token(home, "net-a"))[2]
    request = joining.make_join_request(
        worker, "net-a", host="127.0.0.1", block_port=7001, control_port=7002, token_secret=secret
    )
    grant = accept(home, request)
    caller = proved(server_for(home), grant.node_cert.encode(), node_identity(worker))
    assert caller.role == "worker"
    check_control("health", Caller.member(caller), "net-a")
    with pytest.raises(AccessDenied, match="caps_set is for admin"):
        check_control("caps_set", Caller.member(caller), "net-a")


def test_heartbeat_and_health_ops(tiny_llama, tmp_path):
    """Beats are the admin's; the health view is the admin's, for members; a member's
    lost-link report makes the admin probe the node at once."""

    from tiktrue.control.health_monitor import BeatFailed, HealthMonitor
    from tiktrue.protocol.network_config import config_path, read_config

    home = tmp_path / "admin"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    secret = joining.parse_token(joining.create_join_token(home, "net-a"))[2]
    request = joining.make_join_request(
        tmp_path / "worker",
        "net-a",
        host="127.0.0.1",
        block_port=7001,
        control_port=7002,
        token_secret=secret,
    )
    grant = accept(home, request)
    worker_cert = member(grant.node_cert.encode())
    admin_cert = member((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    worker_id = node_identity(tmp_path / "worker").node_id

    async def refused(node, timeout, fresh):
        raise BeatFailed("connection refused", refused=True)

    async def run():
        monitor = HealthMonitor(read_config(config_path(home, "net-a")), beat=refused)
        service = SimpleNamespace(
            data_dir=home,
            identity=node_identity(home),
            health={},
            admin_beats={},
            heartbeat=lambda nid: {"rss_bytes": 1},
        )
        server = ControlServer(service)
        header = {"network_id": "net-a"}

        async def call(op: str, conn, **fields) -> dict:
            reply, _ = await server._answer(json.dumps({"op": op, **header, **fields}), conn)
            return reply

        worker_beat = await call("heartbeat", worker_cert)
        assert worker_beat["code"] == "forbidden", worker_beat  # only the admin beats
        assert service.admin_beats == {}
        assert (await call("heartbeat", admin_cert))["rss_bytes"] == 1
        assert set(service.admin_beats) == {"net-a"}
        anonymous = Connection(None, "127.0.0.1", None)
        assert (await call("heartbeat", anonymous))["code"] == "forbidden"
        assert (await call("health", worker_cert))["code"] == "not_monitoring"
        service.health["net-a"] = monitor
        view = await call("health", worker_cert)
        assert view["nodes"][worker_id]["state"] == "unknown"
        told = await call("health_suspect", admin_cert, node_id=worker_id, why="link dropped")
        assert told["state"] == "suspect"
        await asyncio.gather(*monitor._probes.values())
        return monitor

    monitor = asyncio.run(run())
    assert monitor.state(worker_id) == "dead"
    assert "lost its link: link dropped" in monitor.nodes[worker_id].history[0]["why"]


def test_only_a_chunk_that_does_not_decrypt_is_called_so(tiny_llama, tmp_path):
    """A block push: a tampered chunk is refused as one; any other failure says what it is."""
    home = tmp_path / "node"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    root = home / "models" / tiny_llama.model_id
    root.mkdir(parents=True)
    shutil.copy(tiny_llama.root / MANIFEST, root / MANIFEST)
    server = server_for(home)
    admin = member((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    path = tiny_llama.manifest.blocks["embed"].file
    chunk = (tiny_llama.root / path).read_bytes()[:1024]
    key = nm.block_key(home, "net-a")
    sealed = encrypt_block_transfer(chunk, key, chunk_aad(tiny_llama.model_id, path, 0))
    meta = {"op": "chunk", "id": "c-0", "network_id": "net-a", "model_id": tiny_llama.model_id}

    def push(payload: bytes) -> dict:
        frame = encode_bytes_frame(payload, **meta, path=path, index=0)
        return asyncio.run(server._answer(frame, admin))[0]

    tampered = push(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert (tampered["code"], tampered["in_reply_to"]) == ("bad_chunk", "c-0"), tampered
    assert "does not decrypt" in tampered["message"]

    (home / "networks" / "net-a" / nm.BLOCK_KEY).unlink()  # a node that never got the key
    no_key = push(sealed)
    assert no_key["code"] == "no_block_key", no_key
    assert no_key["message"] == "this node holds no block key for network net-a"


def test_a_network_that_encrypts_at_rest_gets_its_blocks_sealed(tiny_llama, tmp_path):
    """A push to a node of such a network lands sealed; held and loaded with the key."""
    home = tmp_path / "node"
    nm.create_network(home, "A", tiny_llama, network_id="net-a", encrypt_at_rest=True)
    root = home / "models" / tiny_llama.model_id
    root.mkdir(parents=True)
    shutil.copy(tiny_llama.root / MANIFEST, root / MANIFEST)
    caps = SimpleNamespace(disk_bytes=None)
    arrived = []
    service = SimpleNamespace(
        data_dir=home,
        identity=node_identity(home),
        caps=lambda: caps,
        blocks_arrived=arrived.append,
    )
    server = ControlServer(service)
    admin = member((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    entry = tiny_llama.manifest.blocks["layer_0"]
    plain = (tiny_llama.root / entry.file).read_bytes()
    key = nm.block_key(home, "net-a")
    meta = {"network_id": "net-a", "model_id": tiny_llama.model_id}
    payload = encrypt_block_transfer(plain, key, chunk_aad(tiny_llama.model_id, entry.file, 0))
    frame = encode_bytes_frame(
        payload, op="chunk", id="c", path=entry.file, index=0, last=True, **meta
    )
    assert asyncio.run(server._answer(frame, admin))[0]["complete"] is True
    assert arrived == ["net-a"]  # the service hears of it (a span waiting for it starts)
    sealed = root / (entry.file + ".sealed")
    assert sealed.is_file() and not (root / entry.file).exists()
    assert plain[:256] not in sealed.read_bytes()
    held, _ = asyncio.run(server._answer(json.dumps({"op": "blocks_held", **meta}), admin))
    assert held["blocks"] == ["layer_0"]
    store = BlockStore(root, keyring=block_keyring(home))
    assert store.read_block("layer_0") == plain


def test_a_node_in_no_network_of_the_caller_says_so(tiny_llama, tmp_path):
    """A node that has joined nothing asks for no client certificate: a member's link says
    why it cannot act there (instead of a challenge that fails to verify); the node's owner
    and a caller without a certificate still get their answers."""
    from tiktrue.node.control_link import ControlLink
    from tiktrue.security.auth_manager import IdentityError as Refusal
    from tiktrue.security.node_tls import NetworkCredentials

    admin = tmp_path / "admin"
    nm.create_network(admin, "A", tiny_llama, network_id="net-a")
    fresh = tmp_path / "fresh"
    identity = node_identity(fresh)

    async def go() -> tuple[str, dict, dict]:
        service = SimpleNamespace(data_dir=fresh, identity=identity, host="127.0.0.1")
        server = ControlServer(service)
        await server.start("127.0.0.1", 0)
        address = f"127.0.0.1:{server.port}"
        try:
            credentials = NetworkCredentials.load(admin, "net-a")
            with pytest.raises(Refusal) as refused:
                async with ControlLink(address, expected_node_id=None, credentials=credentials):
                    pass
            async with ControlLink(address, expected_node_id=identity.node_id) as link:
                public = await link.call("node_info")
            async with ControlLink(
                address, expected_node_id=identity.node_id, owner=identity
            ) as link:
                pong = await link.call("ping")
        finally:
            await server.stop()
        return str(refused.value), public, pong

    refused, public, pong = asyncio.run(go())
    assert "does not take certificates of network net-a" in refused
    assert public["public"] is True and public["node_id"] == identity.node_id
    assert pong["ok"] is True


def test_the_admin_of_one_network_cannot_write_the_model_of_another(tiny_llama, tmp_path):
    """A node in two networks: network B runs model-b; network A's admin certificate may not
    push model-b's manifest or chunks (it may push its own model, and new ones)."""
    home = tmp_path / "node"
    config_a = nm.create_network(home, "A", tiny_llama, network_id="net-a")
    write_config(
        home,
        NetworkConfig.model_validate(
            {**config_a.model_dump(), "network_id": "net-b", "name": "B", "model_id": "model-b"}
        ),
    )
    server = ControlServer(SimpleNamespace(data_dir=home, identity=node_identity(home)))
    admin_a = member((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    meta = {"network_id": "net-a", "id": "m"}
    manifest = {**tiny_llama.manifest.model_dump(), "model_id": "model-b"}
    for fields in (
        {"op": "manifest_push", "model_id": "model-b", "manifest": manifest},
        {"op": "blocks_held", "model_id": "model-b"},
    ):
        reply = asyncio.run(server._answer(json.dumps({**meta, **fields}), admin_a))[0]
        assert reply["code"] == "wrong_model" and "network net-b" in reply["message"], reply
    new = {**tiny_llama.manifest.model_dump(), "model_id": "model-c"}
    pushed = {**meta, "op": "manifest_push", "model_id": "model-c", "manifest": new}
    assert asyncio.run(server._answer(json.dumps(pushed), admin_a))[0]["ok"] is True
