"""Signed configs and the join handshake's limits, in this process: what a node takes from
the admin, and what a PC without a certificate can make the admin store."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.network import accept
from tiktrue import limits
from tiktrue.control import join as joining
from tiktrue.control import network_manager as nm
from tiktrue.control.config_signing import ConfigSignatureError, sign_config, verify_config
from tiktrue.control.config_sync import SyncRefused, check_prepare
from tiktrue.protocol.network_config import Revoked, config_path, read_config, write_config
from tiktrue.security.auth_manager import create_network_ca
from tiktrue.service.local_network import prepare_local_network


def _next(config, **changes):
    return config.model_copy(update={"version": config.version + 1, **changes})


def test_only_the_networks_ca_signs_a_config_a_node_takes(tiny_llama, tmp_path):
    homes, config = prepare_local_network(tmp_path / "net", tiny_llama, network_id="signed")
    ca = nm.admin_ca(homes[0], "signed")
    worker = homes[1]
    node_id = config.nodes[1].node_id
    assert verify_config(config, ca.cert_pem) == config  # prepared configs are signed too

    def prepare(offered):
        return asyncio.run(check_prepare(worker, node_id, offered))

    newer = sign_config(_next(config, name="renamed"), ca)
    assert prepare(newer) is True
    refusals = {
        "unsigned_config": _next(config, signature=None),
        "bad_signature": _next(newer, name="altered after signing", version=newer.version),
        # a forger with a CA of its own for a network of the same name
        "forged": sign_config(_next(config), create_network_ca("signed", tmp_path / "evil")),
    }
    for name, offered in refusals.items():
        with pytest.raises(SyncRefused) as refused:
            prepare(offered)
        assert refused.value.code == ("bad_signature" if name == "forged" else name), refused
    with pytest.raises(ConfigSignatureError, match="not signed"):
        verify_config(_next(config, signature=None), ca.cert_pem)

    write_config(worker, sign_config(_next(config, version=5), ca))  # the node is at v5
    with pytest.raises(SyncRefused) as refused:  # v2, signed by the CA, but rolled back
        prepare(sign_config(_next(config), ca))
    assert refused.value.code == "stale_config"


def _request(home, network_id: str, secret=None, **fields):
    request = joining.make_join_request(
        home, network_id, host="127.0.0.1", block_port=7001, control_port=7002, token_secret=secret
    )
    return request.model_copy(update=fields)


def test_join_requests_are_bounded_per_source_and_in_all(tiny_llama, tmp_path, monkeypatch):
    admin = tmp_path / "admin"
    nm.create_network(admin, "A", tiny_llama, network_id="net-a")
    monkeypatch.setattr(limits, "MAX_PENDING_JOINS", 6)
    ids = [
        accept(admin, _request(tmp_path / f"pc{i}", "net-a"), source="10.0.0.9")
        for i in range(limits.MAX_PENDING_JOINS_PER_SOURCE)
    ]
    assert len(set(ids)) == limits.MAX_PENDING_JOINS_PER_SOURCE
    again = accept(admin, _request(tmp_path / "pc0", "net-a"), source="10.0.0.9")
    assert again == ids[0]  # the same PC asking again: the same request
    with pytest.raises(joining.TooManyJoinRequests, match="from 10.0.0.9"):
        accept(admin, _request(tmp_path / "one-more", "net-a"), source="10.0.0.9")
    for i in range(2):  # other sources still get in, up to the total
        accept(admin, _request(tmp_path / f"other{i}", "net-a"), source=f"10.0.1.{i}")
    with pytest.raises(joining.TooManyJoinRequests, match="6 join requests"):
        accept(admin, _request(tmp_path / "late", "net-a"), source="10.0.2.1")
    assert len(joining.list_join_requests(admin, "net-a")) == 6


def test_join_fields_are_size_limited():
    from pydantic import ValidationError

    for field, value in (("name", "x" * 65), ("host", "h" * 254), ("token_secret", "s" * 129)):
        base = {"network_id": "n", "public_key_pem": "k", "proof": "00", "block_port": 1}
        with pytest.raises(ValidationError, match=field):
            joining.JoinRequest.model_validate({**base, field: value})


def test_a_removed_node_cannot_join_again_and_a_grant_must_be_signed(tiny_llama, tmp_path):
    admin = tmp_path / "admin"
    nm.create_network(admin, "A", tiny_llama, network_id="net-a")
    pc = tmp_path / "pc"
    secret = joining.parse_token(joining.create_join_token(admin, "net-a"))[2]
    grant = accept(admin, _request(pc, "net-a", secret))
    tampered = grant.model_copy(update={"config": {**grant.config, "name": "tampered"}})
    with pytest.raises(ConfigSignatureError, match="forged or altered"):
        joining.install_grant(pc, tampered)
    assert joining.install_grant(pc, grant).name == "A"

    config = read_config(config_path(admin, "net-a"))
    node_id = config.nodes[1].node_id
    removed = config.model_copy(
        update={
            "nodes": config.nodes[:1],
            "revoked": [Revoked(node_id=node_id)],
            "version": config.version + 1,
        }
    )
    write_config(admin, removed)
    secret = joining.parse_token(joining.create_join_token(admin, "net-a"))[2]
    with pytest.raises(joining.JoinError, match="was removed"):
        accept(admin, _request(pc, "net-a", secret))
    with pytest.raises(joining.JoinError, match="was removed"):
        accept(admin, _request(pc, "net-a"))  # nor by asking for approval
