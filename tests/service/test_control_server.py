"""Who may do what on a node's control channel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tiktrue.control import network_manager as nm
from tiktrue.security.auth_manager import create_network_ca
from tiktrue.security.node_tls import node_identity
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
