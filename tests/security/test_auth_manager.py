"""Node identities, network CAs, certificates and challenge-response, with real keys."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tiktrue.security.auth_manager import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    NODE_KEY_FILE,
    ChallengeTracker,
    IdentityError,
    NetworkCA,
    certificate_info,
    create_network_ca,
    generate_node_certificate,
    load_or_create_node_identity,
    new_challenge,
    node_id_for_public_key,
    sign_challenge,
    verify_certificate,
    verify_node_identity,
)

CONTEXT = b"join:net-a"


@pytest.fixture()
def ca(tmp_path: Path) -> NetworkCA:
    return create_network_ca("net-a", tmp_path / "ca")


@pytest.fixture()
def worker(tmp_path: Path):
    return load_or_create_node_identity(tmp_path / "worker")


def test_identity_created_once_and_reloaded(tmp_path: Path) -> None:
    first = load_or_create_node_identity(tmp_path / "node")
    key_path = tmp_path / "node" / NODE_KEY_FILE
    assert key_path.is_file()
    before = key_path.read_bytes()
    second = load_or_create_node_identity(tmp_path / "node")
    assert second.node_id == first.node_id
    assert key_path.read_bytes() == before
    assert len(first.node_id) == 16
    assert first.node_id == node_id_for_public_key(first.public_key)
    assert first.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert isinstance(first.private_key.curve, ec.SECP256R1)
    other = load_or_create_node_identity(tmp_path / "other")
    assert other.node_id != first.node_id


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_private_keys_are_owner_only(tmp_path: Path, ca: NetworkCA) -> None:
    load_or_create_node_identity(tmp_path / "node")
    for path in (tmp_path / "node" / NODE_KEY_FILE, ca.directory / CA_KEY_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_key_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / NODE_KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="cannot be read"):
        load_or_create_node_identity(tmp_path)
    assert (tmp_path / NODE_KEY_FILE).read_bytes() == b"not a key"


def test_ca_written_loaded_and_not_overwritten(ca: NetworkCA) -> None:
    assert (ca.directory / CA_CERT_FILE).read_bytes() == ca.cert_pem
    bc = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ku = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    loaded = NetworkCA.load(ca.directory)
    assert loaded.network_id == "net-a"
    assert loaded.cert_pem == ca.cert_pem
    with pytest.raises(FileExistsError):
        create_network_ca("net-a", ca.directory)


def test_node_certificate_fields(ca: NetworkCA, worker) -> None:
    pem = generate_node_certificate(ca, worker, "worker", hosts=("127.0.0.1", "node-1.lan"))
    info = verify_certificate(pem, ca.cert_pem)
    assert (info.node_id, info.role, info.network_id) == (worker.node_id, "worker", "net-a")
    assert info == certificate_info(pem)
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["node-1.lan"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not (ca.directory / f"{worker.node_id}.pem").exists()


@pytest.mark.parametrize("role", ["root", "Admin", ""])
def test_invalid_role_refused(ca: NetworkCA, worker, role: str) -> None:
    with pytest.raises(ValueError, match="role"):
        generate_node_certificate(ca, worker, role)


def test_node_id_must_match_key(ca: NetworkCA, worker, tmp_path: Path) -> None:
    other = load_or_create_node_identity(tmp_path / "other")
    with pytest.raises(ValueError, match="not derived"):
        ca.generate_node_certificate(other.node_id, worker.public_key, "worker")


def test_verify_certificate_refuses_other_ca_expired_and_ca(
    ca: NetworkCA, worker, tmp_path: Path
) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    other_ca = create_network_ca("net-b", tmp_path / "ca-b")
    with pytest.raises(IdentityError, match="not by this network's CA"):
        verify_certificate(pem, other_ca.cert_pem)
    # Same subject as our CA but another key: the signature check catches it.
    impostor = create_network_ca("net-a", tmp_path / "ca-impostor")
    with pytest.raises(IdentityError, match="signature"):
        verify_certificate(pem, impostor.cert_pem)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    with pytest.raises(IdentityError, match="expired"):
        verify_certificate(pem, ca.cert_pem, now=later)
    with pytest.raises(IdentityError, match="not a CA"):
        verify_certificate(ca.cert_pem, ca.cert_pem)
    with pytest.raises(IdentityError, match="not a CA"):
        verify_certificate(pem, pem)
    with pytest.raises(IdentityError, match="not a valid PEM"):
        verify_certificate(b"garbage", ca.cert_pem)


# --- challenge-response ----------------------------------------------------------------------


def test_good_answer_accepted(ca: NetworkCA, worker) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    nonce = new_challenge()
    assert len(nonce) == 32 and nonce != new_challenge()
    sig = sign_challenge(worker, nonce, CONTEXT)
    info = verify_node_identity(pem, ca.cert_pem, nonce, sig, CONTEXT, expected_role="worker")
    assert info.node_id == worker.node_id
    assert verify_node_identity(pem, ca.cert_pem, nonce, sig, CONTEXT, ("worker", "backup"))


def test_wrong_key_refused(ca: NetworkCA, worker, tmp_path: Path) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    thief = load_or_create_node_identity(tmp_path / "thief")
    nonce = new_challenge()
    sig = sign_challenge(thief, nonce, CONTEXT)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_node_identity(pem, ca.cert_pem, nonce, sig, CONTEXT)


def test_wrong_nonce_or_context_refused(ca: NetworkCA, worker) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    nonce = new_challenge()
    sig = sign_challenge(worker, nonce, CONTEXT)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_node_identity(pem, ca.cert_pem, new_challenge(), sig, CONTEXT)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_node_identity(pem, ca.cert_pem, nonce, sig, b"join:net-b")
    with pytest.raises(IdentityError, match="shorter"):
        verify_node_identity(pem, ca.cert_pem, b"", sign_challenge(worker, b"", CONTEXT), CONTEXT)


def test_tampered_signature_refused(ca: NetworkCA, worker) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    nonce = new_challenge()
    sig = bytearray(sign_challenge(worker, nonce, CONTEXT))
    sig[-1] ^= 0x01
    with pytest.raises(IdentityError):
        verify_node_identity(pem, ca.cert_pem, nonce, bytes(sig), CONTEXT)
    with pytest.raises(IdentityError):
        verify_node_identity(pem, ca.cert_pem, nonce, b"\x30\x00", CONTEXT)


def test_other_ca_refused(ca: NetworkCA, worker, tmp_path: Path) -> None:
    other_ca = create_network_ca("net-b", tmp_path / "ca-b")
    pem = generate_node_certificate(other_ca, worker, "admin")
    nonce = new_challenge()
    sig = sign_challenge(worker, nonce, CONTEXT)
    with pytest.raises(IdentityError, match="network's CA"):
        verify_node_identity(pem, ca.cert_pem, nonce, sig, CONTEXT)


def test_role_mismatch_refused(ca: NetworkCA, worker) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    nonce = new_challenge()
    sig = sign_challenge(worker, nonce, CONTEXT)
    with pytest.raises(IdentityError, match="role 'worker'"):
        verify_node_identity(pem, ca.cert_pem, nonce, sig, CONTEXT, expected_role="admin")


def test_tracker_refuses_replay_unknown_and_expired(ca: NetworkCA, worker) -> None:
    pem = generate_node_certificate(ca, worker, "worker")
    now = [100.0]
    tracker = ChallengeTracker(ttl=10, clock=lambda: now[0])

    nonce = tracker.issue()
    sig = sign_challenge(worker, nonce, CONTEXT)
    assert tracker.verify(pem, ca.cert_pem, nonce, sig, CONTEXT, "worker").node_id
    with pytest.raises(IdentityError, match="already used"):
        tracker.verify(pem, ca.cert_pem, nonce, sig, CONTEXT, "worker")

    foreign = new_challenge()  # never issued by this tracker
    with pytest.raises(IdentityError, match="unknown"):
        tracker.verify(pem, ca.cert_pem, foreign, sign_challenge(worker, foreign, CONTEXT), CONTEXT)

    late = tracker.issue()
    now[0] += 11
    with pytest.raises(IdentityError, match="expired"):
        tracker.verify(pem, ca.cert_pem, late, sign_challenge(worker, late, CONTEXT), CONTEXT)

    # A failed answer still spends the nonce.
    spent = tracker.issue()
    with pytest.raises(IdentityError):
        tracker.verify(pem, ca.cert_pem, spent, b"bad", CONTEXT)
    with pytest.raises(IdentityError, match="already used"):
        tracker.consume(spent)


def test_tracker_bounds_pending(worker) -> None:
    tracker = ChallengeTracker(ttl=60, max_pending=3)
    nonces = [tracker.issue() for _ in range(5)]
    assert len(tracker) == 3
    with pytest.raises(IdentityError):
        tracker.consume(nonces[0])
    tracker.consume(nonces[-1])
