"""Who may do what on a node's control channel."""

from __future__ import annotations

import asyncio
import json
import shutil
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tiktrue.control import network_manager as nm
from tiktrue.model.store import MANIFEST, BlockStore, chunk_aad
from tiktrue.protocol.frames import encode_bytes_frame
from tiktrue.security.auth_manager import create_network_ca
from tiktrue.security.crypto_layer import encrypt_block_transfer
from tiktrue.security.node_tls import block_keyring, node_identity
from tiktrue.service.control_server import ControlServer, Refused


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_only_this_networks_ca_can_speak_for_it(tiny_llama, tmp_path):
    home = tmp_path / "node"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    server = ControlServer(SimpleNamespace(data_dir=home))
    admin = (home / "networks" / "net-a" / "node_cert.pem").read_bytes()
    assert server._require_admin(der(admin), "net-a").role == "admin"

    # another network's admin forges a certificate that names net-a
    evil_ca = create_network_ca("net-a", tmp_path / "evil-ca")
    intruder = node_identity(tmp_path / "intruder")
    forged = evil_ca.generate_node_certificate(intruder.node_id, intruder.public_key, "admin")
    with pytest.raises(Refused, match="not a certificate of network net-a"):
        server._require_admin(der(forged), "net-a")
    with pytest.raises(Refused, match="only members"):
        server._require_admin(None, "net-a")
    with pytest.raises(Refused, match="only members"):
        server._require_admin(der(admin), "net-unknown")


def test_a_worker_certificate_is_not_an_admin(tiny_llama, tmp_path):
    home = tmp_path / "admin"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    worker = tmp_path / "worker"
    secret = nm.parse_token(nm.create_join_token(home, "net-a"))[2]
    request = nm.make_join_request(
        worker, "net-a", host="127.0.0.1", block_port=7001, control_port=7002, token_secret=secret
    )
    grant = nm.accept_join(home, request)
    server = ControlServer(SimpleNamespace(data_dir=home))
    assert server._member(der(grant.node_cert.encode()), "net-a").role == "worker"
    with pytest.raises(Refused, match="only the admin"):
        server._require_admin(der(grant.node_cert.encode()), "net-a")


def test_heartbeat_and_health_ops(tiny_llama, tmp_path):
    """Beats are for members (only the admin's is noted); the health view is the admin's, for
    members; a member's lost-link report makes the admin probe the node at once."""
    import asyncio

    from tiktrue.control.health_monitor import BeatFailed, HealthMonitor
    from tiktrue.protocol.network_config import config_path, read_config

    home = tmp_path / "admin"
    nm.create_network(home, "A", tiny_llama, network_id="net-a")
    secret = nm.parse_token(nm.create_join_token(home, "net-a"))[2]
    request = nm.make_join_request(
        tmp_path / "worker",
        "net-a",
        host="127.0.0.1",
        block_port=7001,
        control_port=7002,
        token_secret=secret,
    )
    grant = nm.accept_join(home, request)
    worker_cert = der(grant.node_cert.encode())
    admin_cert = der((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    worker_id = node_identity(tmp_path / "worker").node_id

    async def refused(node, timeout, fresh):
        raise BeatFailed("connection refused", refused=True)

    async def run():
        monitor = HealthMonitor(read_config(config_path(home, "net-a")), beat=refused)
        service = SimpleNamespace(
            data_dir=home, health={}, admin_beats={}, heartbeat=lambda nid: {"rss_bytes": 1}
        )
        server = ControlServer(service)
        header = {"network_id": "net-a"}
        assert await server.op_heartbeat(header, None, worker_cert, False) == {"rss_bytes": 1}
        assert service.admin_beats == {}  # a worker's beat is not the admin's
        await server.op_heartbeat(header, None, admin_cert, False)
        assert set(service.admin_beats) == {"net-a"}
        with pytest.raises(Refused, match="only members"):
            await server.op_heartbeat(header, None, None, False)
        with pytest.raises(Refused, match="does not monitor"):
            await server.op_health(header, None, worker_cert, False)
        service.health["net-a"] = monitor
        view = await server.op_health(header, None, worker_cert, False)
        assert view["nodes"][worker_id]["state"] == "unknown"
        told = {"node_id": worker_id, "why": "link dropped", **header}
        assert (await server.op_health_suspect(told, None, admin_cert, False)) == {
            "state": "suspect"
        }
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
    server = ControlServer(SimpleNamespace(data_dir=home))
    admin = der((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    path = tiny_llama.manifest.blocks["embed"].file
    chunk = (tiny_llama.root / path).read_bytes()[:1024]
    key = nm.block_key(home, "net-a")
    sealed = encrypt_block_transfer(chunk, key, chunk_aad(tiny_llama.model_id, path, 0))
    meta = {"op": "chunk", "id": "c-0", "network_id": "net-a", "model_id": tiny_llama.model_id}

    def push(payload: bytes) -> dict:
        frame = encode_bytes_frame(payload, **meta, path=path, index=0)
        return asyncio.run(server._answer(frame, admin, True))

    tampered = push(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert (tampered["code"], tampered["in_reply_to"]) == ("bad_chunk", "c-0"), tampered
    assert "does not decrypt" in tampered["message"]

    (home / "networks" / "net-a" / nm.BLOCK_KEY).unlink()  # a node that never got the key
    no_key = push(sealed)
    assert no_key["code"] == "join_refused", no_key
    assert no_key["message"] == "this node holds no block key for network net-a"


def test_a_network_that_encrypts_at_rest_gets_its_blocks_sealed(tiny_llama, tmp_path):
    """A push to a node of such a network lands sealed; held and loaded with the key."""
    home = tmp_path / "node"
    nm.create_network(home, "A", tiny_llama, network_id="net-a", encrypt_at_rest=True)
    root = home / "models" / tiny_llama.model_id
    root.mkdir(parents=True)
    shutil.copy(tiny_llama.root / MANIFEST, root / MANIFEST)
    caps = SimpleNamespace(disk_bytes=None)
    server = ControlServer(SimpleNamespace(data_dir=home, caps=lambda: caps))
    admin = der((home / "networks" / "net-a" / "node_cert.pem").read_bytes())
    entry = tiny_llama.manifest.blocks["layer_0"]
    plain = (tiny_llama.root / entry.file).read_bytes()
    key = nm.block_key(home, "net-a")
    meta = {"network_id": "net-a", "model_id": tiny_llama.model_id}
    payload = encrypt_block_transfer(plain, key, chunk_aad(tiny_llama.model_id, entry.file, 0))
    frame = encode_bytes_frame(
        payload, op="chunk", id="c", path=entry.file, index=0, last=True, **meta
    )
    assert asyncio.run(server._answer(frame, admin, True))["complete"] is True
    sealed = root / (entry.file + ".sealed")
    assert sealed.is_file() and not (root / entry.file).exists()
    assert plain[:256] not in sealed.read_bytes()
    held = asyncio.run(server._answer(json.dumps({"op": "blocks_held", **meta}), admin, True))
    assert held["blocks"] == ["layer_0"]
    store = BlockStore(root, keyring=block_keyring(home))
    assert store.read_block("layer_0") == plain
