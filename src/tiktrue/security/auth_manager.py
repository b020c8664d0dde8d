"""Node identities, network CAs, node certificates and challenge-response (seed 000, phase 6).

Every node owns one ECDSA P-256 key (``node_key.pem``) from its first start; its ``node_id`` is
derived from the public key, so a certificate can only name the node that holds the key. Each
network has its own CA that signs node certificates carrying the node's role (subject
``CN=node_id, OU=role, O=network_id``). On top of mutual TLS, ``verify_node_identity`` checks that
the peer signs a fresh nonce with the key of a certificate issued by this network's CA and not
revoked (``security.link_auth`` binds that nonce to the TLS session of each connection). The CA
key also signs documents the whole network must trust, the network configs
(``sign_document``), so a node can tell the admin's config from a forged one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES: tuple[str, ...] = ("admin", "worker", "backup")
# a read-only certificate for a scraper (Prometheus): it reads a node's /metrics and nothing
# else; it is no node's role, so every node and block link refuses it (verify_certificate)
MONITOR = "monitor"
CERT_ROLES: tuple[str, ...] = (*ROLES, MONITOR)
NODE_KEY_FILE = "node_key.pem"
CA_CERT_FILE = "ca_cert.pem"
CA_KEY_FILE = "ca_key.pem"
CA_UNIT = "tiktrue-network-ca"
CHALLENGE_DOMAIN = b"tiktrue-challenge-v1"
DOCUMENT_DOMAIN = b"tiktrue-document-v1"
NONCE_BYTES = 32
MIN_NONCE_BYTES = 16
CA_VALID_DAYS = 3650
# Certificates start a little in the past so that a peer whose clock lags still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
_MAX_NAME = 64  # X.509 upper bound for CN / O / OU


class SecurityError(Exception):
    """Base class of TikTrue's security errors."""


class IdentityError(SecurityError):
    """A certificate, key or challenge answer could not be trusted; the message says why."""


@dataclass(frozen=True)
class CertInfo:
    """What a node certificate says about its holder."""

    node_id: str
    role: str
    network_id: str
    not_after: dt.datetime


@dataclass(frozen=True)
class NodeIdentity:
    """This node's long-lived key pair; ``node_id`` is derived from the public key."""

    node_id: str
    private_key: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    @property
    def key_path(self) -> Path:
        return self.directory / NODE_KEY_FILE

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, e.g. for an in-memory TLS context; never log it."""
        return _private_pem(self.private_key)


# --- helpers ---------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively with owner-only permissions (POSIX); never overwrite."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if os.name != "nt":
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner may enter (POSIX 0o700, also when it existed
    with wider permissions); whatever is written inside is then the owner's alone, whoever
    writes it. On Windows the user's profile is private already."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name != "nt":
        os.chmod(path, 0o700)
    return path


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise ValueError(f"{kind} must be a non-empty string of at most {_MAX_NAME} characters")
    if not value.isprintable():
        raise ValueError(f"{kind} contains non-printable characters: {value!r}")
    return value


def _check_role(role: str) -> str:
    if role not in CERT_ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(CERT_ROLES)}")
    return role


def _require_p256(key: object, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) or not (
        isinstance(key.curve, ec.SECP256R1)
    ):
        raise IdentityError(f"{what} is not an ECDSA P-256 key")


def node_id_for_public_key(public_key: ec.EllipticCurvePublicKey) -> str:
    """First 16 hex chars of sha256 over the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def _load_cert(cert: bytes | str | x509.Certificate, what: str = "certificate") -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode("ascii") if isinstance(cert, str) else cert
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{what} is not a valid PEM certificate: {exc}") from exc


def _single_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _parse_host(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise ValueError("empty host name in certificate hosts")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise IdentityError(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")


# --- node identity ---------------------------------------------------------------------------


def load_or_create_node_identity(directory: Path) -> NodeIdentity:
    """Load ``directory/node_key.pem``, creating a fresh P-256 key on first call."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NODE_KEY_FILE
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            _write_private_file(path, _private_pem(key))
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            return NodeIdentity(node_id_for_public_key(key.public_key()), key, directory)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"node key {path} cannot be read: {exc}") from exc
    _require_p256(loaded, f"node key {path}")
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return NodeIdentity(node_id_for_public_key(loaded.public_key()), loaded, directory)


# --- network CA ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkCA:
    """The certificate authority of one network; lives on the network's admin node."""

    network_id: str
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load(cls, directory: Path) -> NetworkCA:
        directory = Path(directory)
        cert = _load_cert((directory / CA_CERT_FILE).read_bytes(), "network CA certificate")
        try:
            key = serialization.load_pem_private_key(
                (directory / CA_KEY_FILE).read_bytes(), password=None
            )
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"network CA key in {directory} cannot be read: {exc}") from exc
        _require_p256(key, "network CA key")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise IdentityError(f"network CA key in {directory} does not match its certificate")
        network_id = _single_attr(cert.subject, NameOID.ORGANIZATION_NAME)
        if network_id is None:
            raise IdentityError("network CA certificate does not name its network")
        return cls(network_id, cert, key, directory)

    def generate_node_certificate(
        self,
        node_id: str,
        public_key: ec.EllipticCurvePublicKey | bytes,
        role: str,
        hosts: Iterable[str] = ("127.0.0.1", "localhost"),
        days: int = 365,
    ) -> bytes:
        """Sign a leaf certificate (PEM) for ``node_id`` with ``role``, valid for TLS both ways
        (``role`` may be ``MONITOR``: a scraper's read-only certificate, no node's).

        ``hosts`` become the SubjectAlternativeName (IP addresses or DNS names) that TLS clients
        check. The certificate never outlives the CA.
        """
        _check_role(role)
        _check_name("node_id", node_id)
        if isinstance(public_key, bytes):
            public_key = serialization.load_pem_public_key(public_key)  # type: ignore[assignment]
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ValueError("node public key must be ECDSA P-256")
        if node_id != node_id_for_public_key(public_key):
            raise ValueError(f"node_id {node_id!r} is not derived from the given public key")
        if days <= 0:
            raise ValueError("days must be positive")
        names = [_parse_host(h) for h in hosts]
        if not names:
            raise ValueError("a node certificate needs at least one host")

        now = _utcnow()
        not_after = min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.network_id),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, node_id),
            ]
        )
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self.private_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def create_network_ca(network_id: str, directory: Path) -> NetworkCA:
    """Make a network's CA key and self-signed certificate; refuses to replace an existing CA."""
    _check_name("network_id", network_id)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"a network CA already exists in {directory}")

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, network_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CA_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, f"TikTrue CA {network_id}"[:_MAX_NAME]),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_private_file(key_path, _private_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return NetworkCA(network_id, cert, key, directory)


def generate_node_certificate(
    ca: NetworkCA,
    identity: NodeIdentity,
    role: str,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
) -> bytes:
    """Sign ``identity``'s certificate for ``role`` in ``ca``'s network; returns PEM only."""
    return ca.generate_node_certificate(identity.node_id, identity.public_key, role, hosts, days)


# --- reading and verifying certificates ------------------------------------------------------


def certificate_info(cert: bytes | str | x509.Certificate) -> CertInfo:
    """Read node id, role and network from a node certificate (does not verify it)."""
    parsed = _load_cert(cert)
    node_id = _single_attr(parsed.subject, NameOID.COMMON_NAME)
    role = _single_attr(parsed.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    network_id = _single_attr(parsed.subject, NameOID.ORGANIZATION_NAME)
    if node_id is None or role is None or network_id is None:
        raise IdentityError("certificate subject lacks CN (node id), OU (role) or O (network)")
    return CertInfo(node_id, role, network_id, parsed.not_valid_after_utc)


def verify_certificate(
    cert_pem: bytes | str | x509.Certificate,
    ca_cert_pem: bytes | str | x509.Certificate,
    *,
    now: dt.datetime | None = None,
) -> CertInfo:
    """Check that a node certificate was issued by this network CA and is usable now."""
    cert = _load_cert(cert_pem, "node certificate")
    ca = _load_cert(ca_cert_pem, "network CA certificate")
    now = now or _utcnow()

    ca_bc = _basic_constraints(ca)
    if ca_bc is None or not ca_bc.ca:
        raise IdentityError("the given network CA certificate is not a CA")
    _check_validity(ca, now, "network CA certificate")
    if cert.issuer != ca.subject:
        raise IdentityError(
            f"certificate issued by {cert.issuer.rfc4514_string()!r}, "
            f"not by this network's CA {ca.subject.rfc4514_string()!r}"
        )
    ca_key = ca.public_key()
    hash_alg = cert.signature_hash_algorithm
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or hash_alg is None:
        raise IdentityError("network CA certificate does not hold an ECDSA key")
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
    except InvalidSignature as exc:
        raise IdentityError("certificate signature does not verify against this CA") from exc
    _check_validity(cert, now, "node certificate")
    bc = _basic_constraints(cert)
    if bc is None or bc.ca:
        raise IdentityError("a node certificate must be marked as not a CA")

    info = certificate_info(cert)
    if info.role not in ROLES:
        raise IdentityError(f"certificate carries unknown role {info.role!r}")
    ca_network = _single_attr(ca.subject, NameOID.ORGANIZATION_NAME)
    if info.network_id != ca_network:
        raise IdentityError(
            f"certificate is for network {info.network_id!r}, CA is for {ca_network!r}"
        )
    public_key = cert.public_key()
    _require_p256(public_key, "certificate key")
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    if info.node_id != node_id_for_public_key(public_key):
        raise IdentityError(f"certificate names node {info.node_id!r} but holds another key")
    return info


# --- challenge-response ----------------------------------------------------------------------


def new_challenge() -> bytes:
    """A fresh random nonce for the peer to sign."""
    return secrets.token_bytes(NONCE_BYTES)


def _challenge_message(nonce: bytes, context: bytes) -> bytes:
    # The context is length-prefixed so that (context, nonce) pairs can never collide.
    return CHALLENGE_DOMAIN + struct.pack(">I", len(context)) + context + nonce


def sign_challenge(identity: NodeIdentity, nonce: bytes, context: bytes) -> bytes:
    """Answer a challenge: ECDSA-SHA256 (DER) over the domain-separated nonce and context.

    ``context`` should bind the answer to its purpose, e.g. ``b"join:" + network_id``, so an
    answer given for one purpose cannot be replayed for another.
    """
    return identity.private_key.sign(_challenge_message(nonce, context), ec.ECDSA(hashes.SHA256()))


def verify_key_possession(
    public_key: ec.EllipticCurvePublicKey | bytes, nonce: bytes, signature: bytes, context: bytes
) -> str:
    """Check a challenge answer against a bare public key (a node that holds no certificate
    yet, e.g. when it asks to join); returns the key's node id, raises ``IdentityError``."""
    try:
        if isinstance(public_key, bytes):
            public_key = serialization.load_pem_public_key(public_key)  # type: ignore[assignment]
        _require_p256(public_key, "node public key")
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(signature, _challenge_message(nonce, context), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise IdentityError(f"the answer does not prove possession of the key: {exc}") from exc
    return node_id_for_public_key(public_key)


def verify_node_identity(
    cert_pem: bytes | str | x509.Certificate,
    ca_cert_pem: bytes | str | x509.Certificate,
    nonce: bytes,
    signature: bytes,
    context: bytes,
    expected_role: str | Collection[str] | None = None,
    revoked: Collection[str] = (),
) -> CertInfo:
    """Verify the peer's certificate against the network CA and its signature over ``nonce``.

    Use a nonce this side generated (see ``ChallengeTracker``, or ``link_auth`` for one per
    connection); ``revoked`` holds the node ids the network has removed (the signed config's
    revocation list). Raises ``IdentityError`` on any failure and returns the peer's
    ``CertInfo`` on success.
    """
    info = verify_certificate(cert_pem, ca_cert_pem)
    if info.node_id in revoked:
        raise IdentityError(f"node {info.node_id} was removed from network {info.network_id}")
    if expected_role is not None:
        allowed = {expected_role} if isinstance(expected_role, str) else set(expected_role)
        if info.role not in allowed:
            raise IdentityError(
                f"node {info.node_id} has role {info.role!r}, expected {sorted(allowed)}"
            )
    if len(nonce) < MIN_NONCE_BYTES:
        raise IdentityError(f"challenge nonce is shorter than {MIN_NONCE_BYTES} bytes")
    public_key = _load_cert(cert_pem).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked by verify_certificate
    try:
        verify_key_possession(public_key, nonce, signature, context)
    except IdentityError as exc:
        raise IdentityError(
            f"challenge answer from node {info.node_id} does not verify "
            "(wrong key, nonce or context)"
        ) from exc
    return info


def _document_message(kind: str, data: bytes) -> bytes:
    label = kind.encode()
    return DOCUMENT_DOMAIN + struct.pack(">I", len(label)) + label + data


def sign_document(ca: NetworkCA, kind: str, data: bytes) -> bytes:
    """The network CA's ECDSA-SHA256 signature (DER) over ``data``, labelled ``kind`` (e.g.
    ``"network-config"``) so a signature made for one kind of document never passes for
    another, nor for a challenge answer."""
    return ca.private_key.sign(_document_message(kind, data), ec.ECDSA(hashes.SHA256()))


def verify_document(
    ca_cert_pem: bytes | str | x509.Certificate, kind: str, data: bytes, signature: bytes
) -> None:
    """Raises ``IdentityError`` unless ``signature`` is the network CA's over ``data``."""
    public_key = _load_cert(ca_cert_pem, "network CA certificate").public_key()
    _require_p256(public_key, "network CA key")
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    try:
        public_key.verify(signature, _document_message(kind, data), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise IdentityError(f"the {kind} is not signed by this network's CA") from exc


class ChallengeTracker:
    """Issues nonces and accepts each one once, within ``ttl`` seconds, against replay."""

    def __init__(
        self,
        ttl: float = 30.0,
        max_pending: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_pending <= 0:
            raise ValueError("ttl and max_pending must be positive")
        self.ttl = ttl
        self.max_pending = max_pending
        self._clock = clock
        self._pending: dict[bytes, float] = {}  # nonce -> expiry, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def _prune(self, now: float) -> None:
        for nonce in [n for n, expiry in self._pending.items() if expiry < now]:
            del self._pending[nonce]
        while len(self._pending) >= self.max_pending:
            del self._pending[next(iter(self._pending))]

    def issue(self) -> bytes:
        nonce = new_challenge()
        with self._lock:
            now = self._clock()
            self._prune(now)
            self._pending[nonce] = now + self.ttl
        return nonce

    def consume(self, nonce: bytes) -> None:
        """Spend ``nonce``; raises ``IdentityError`` if unknown, already used or expired."""
        with self._lock:
            expiry = self._pending.pop(bytes(nonce), None)
            now = self._clock()
        if expiry is None:
            raise IdentityError("unknown or already used challenge nonce (possible replay)")
        if now > expiry:
            raise IdentityError(f"challenge nonce expired (older than {self.ttl:g} s)")

    def verify(
        self,
        cert_pem: bytes | str | x509.Certificate,
        ca_cert_pem: bytes | str | x509.Certificate,
        nonce: bytes,
        signature: bytes,
        context: bytes,
        expected_role: str | Collection[str] | None = None,
    ) -> CertInfo:
        """Spend the nonce (even if the answer then fails) and run ``verify_node_identity``."""
        self.consume(nonce)
        return verify_node_identity(cert_pem, ca_cert_pem, nonce, signature, context, expected_role)
