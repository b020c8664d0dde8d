"""Creating a network and admitting nodes (tokens, requests, approvals, grants), on files only
(the processes are in integration)."""

from __future__ import annotations

import pytest

from tests.helpers.network import accept, decide
from tiktrue.control import join as joining
from tiktrue.control import network_manager as nm
from tiktrue.protocol.network_config import ConfigError, config_path, read_config
from tiktrue.security.auth_manager import verify_certificate
from tiktrue.security.node_tls import node_identity


@pytest.fixture
def admin(tiny_llama, tmp_path):
    home = tmp_path / "admin"
    config = nm.create_network(home, "Office", tiny_llama, port=7500, network_id="office")
    return home, config


def request_from(home, token=None, network_id="office"):
    secret = joining.parse_token(token)[2] if token else None
    return joining.make_join_request(
        home, network_id, host="127.0.0.1", block_port=7501, control_port=7502, token_secret=secret
    )


def test_create_network_makes_a_ca_a_config_and_serves_everything(admin, tiny_llama):
    home, config = admin
    assert config.nodes[0].role == "admin"
    assert config.nodes[0].blocks == tiny_llama.manifest.model_chain_order
    ca = (home / "networks" / "office" / "ca_cert.pem").read_bytes()
    cert = (home / "networks" / "office" / "node_cert.pem").read_bytes()
    assert verify_certificate(cert, ca).role == "admin"
    assert len(nm.block_key(home, "office")) == 32
    with pytest.raises(ConfigError, match="network office already exists"):
        nm.create_network(home, "again", tiny_llama, network_id="office")


def test_a_token_admits_one_node_once(admin, tmp_path):
    home, _ = admin
    token = joining.create_join_token(home, "office")
    assert token.split(".")[1] == node_identity(home).node_id
    worker = tmp_path / "worker"
    grant = accept(home, request_from(worker, token))
    config = joining.install_grant(worker, grant)
    assert node_identity(worker).node_id in {n.node_id for n in config.nodes}
    assert read_config(config_path(home, "office")).version == 2
    assert verify_certificate(grant.node_cert.encode(), grant.ca_cert.encode()).role == "worker"
    with pytest.raises(joining.JoinError, match="already used"):
        accept(home, request_from(tmp_path / "other", token))
    forged = token.rsplit(".", 1)[0] + ".guess"
    with pytest.raises(joining.JoinError, match="unknown join token"):
        accept(home, request_from(tmp_path / "other", forged))


def test_an_expired_token_and_a_request_without_proof_are_refused(admin, tmp_path):
    home, _ = admin
    token = joining.create_join_token(home, "office", ttl=-1)
    with pytest.raises(joining.JoinError, match="expired"):
        accept(home, request_from(tmp_path / "late", token))
    request = request_from(tmp_path / "liar")
    request.public_key_pem = node_identity(tmp_path / "victim").public_key_pem().decode()
    with pytest.raises(joining.JoinError, match="does not prove"):
        accept(home, request)


def test_approval_flow_and_only_the_author_may_read_the_grant(admin, tmp_path):
    home, _ = admin
    asking = request_from(tmp_path / "asker")
    request_id = accept(home, asking)
    assert accept(home, asking) == request_id  # asking twice: one request
    assert joining.join_status(home, asking, request_id) == ("pending", None)
    with pytest.raises(joining.JoinError, match="another node"):
        joining.join_status(home, request_from(tmp_path / "snoop"), request_id)
    decide(home, "office", request_id)
    state, grant = joining.join_status(home, asking, request_id)
    assert state == "approved" and grant.node_cert
    assert "block_key" not in grant.model_dump()  # that comes over mutual TLS, after
    with pytest.raises(joining.JoinError, match="already approved"):
        decide(home, "office", request_id)


def test_only_the_admin_hands_out_tokens(admin, tmp_path):
    home, _ = admin
    worker = tmp_path / "worker"
    joining.install_grant(
        worker,
        accept(home, request_from(worker, joining.create_join_token(home, "office"))),
    )
    with pytest.raises(nm.NotAdmin, match="not the admin"):
        joining.create_join_token(worker, "office")
    assert [c.network_id for c in nm.list_joined_networks(worker)] == ["office"]
    nm.leave_network(worker, "office")
    assert nm.list_joined_networks(worker) == []
