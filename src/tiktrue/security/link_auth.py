"""Challenge-response on every node-to-node connection, bound to that connection's TLS session.

Mutual TLS already proves that each end holds the key of the certificate it shows. On top of
it (DESIGN.md §6), once per connection and never per message, each side sends a fresh random
nonce and signs the other side's nonce together with a *binding* of this very TLS session::

    binding = sha256(domain, purpose, tls-unique, sha256(client cert), sha256(server cert))

- a **replayed** answer was made for another nonce and another session: refused;
- a **relay** (a man in the middle that holds a certificate of its own and forwards the
  challenge between two connections) has two TLS sessions with different tls-unique values
  and different certificates on each leg: the answer it forwards names the other leg;
- a **reflected** answer (the server's own signature sent back to it) carries the wrong side
  label: each side signs ``client`` or ``server`` into its answer.

Why tls-unique: Python's ``ssl`` has no ``export_keying_material`` (RFC 5705; the TLS 1.3
channel binding of RFC 9266, tls-exporter, is built on it), and replacing ``ssl`` with
pyOpenSSL under asyncio and websockets is not worth it for this. ``get_channel_binding
("tls-unique")`` under TLS 1.3 with OpenSSL 3 returns the client's Finished verify_data: an
HMAC over the hash of the whole handshake transcript (both randoms, both key shares, both
certificates). Both ends see the same value, and a new one on every connection (tested in
tests/security/test_link_auth.py). RFC 8446 leaves tls-unique undefined for TLS 1.3 (its
analysis was deferred), so nothing here leans on it alone: both certificates are bound too, and
the nonces make each answer fresh even where a build returned no tls-unique at all (the binding
then still names both certificates, which is what defeats a relay).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tiktrue.security.auth_manager import (
    MIN_NONCE_BYTES,
    CertInfo,
    IdentityError,
    NodeIdentity,
    new_challenge,
    sign_challenge,
    verify_key_possession,
    verify_node_identity,
)

LINK_DOMAIN = b"tiktrue-link-v1"
MAX_NONCE_BYTES = 64
MAX_PROOF_HEX = 160  # a DER ECDSA P-256 signature is at most 72 bytes
SIDES = ("client", "server")


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def session_binding(ssl_object, *, purpose: str, own_cert: bytes | None, server: bool) -> bytes:
    """What both ends of this TLS connection compute alike: its tls-unique value and both
    certificates (DER; ``b""`` for a side that showed none), for ``purpose`` (e.g.
    ``"block:net-1"``, ``"control"``) so an answer for one kind of link never passes for
    another."""
    if ssl_object is None:
        raise IdentityError("the connection is not TLS: nothing to bind the challenge to")
    peer = ssl_object.getpeercert(binary_form=True) or b""
    own = own_cert or b""
    client, server_cert = (peer, own) if server else (own, peer)
    unique = ssl_object.get_channel_binding("tls-unique") or b""
    return hashlib.sha256(
        LINK_DOMAIN
        + _field(purpose.encode())
        + _field(unique)
        + hashlib.sha256(client).digest()
        + hashlib.sha256(server_cert).digest()
    ).digest()


def parse_nonce(text: object) -> bytes:
    """A nonce as it travels (hex), checked: raises ``IdentityError`` when it is not one."""
    try:
        nonce = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        nonce = b""
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise IdentityError(
            f"a challenge nonce must be {MIN_NONCE_BYTES}..{MAX_NONCE_BYTES} bytes of hex"
        )
    return nonce


def parse_proof(text: object) -> bytes:
    try:
        if isinstance(text, str) and 0 < len(text) <= MAX_PROOF_HEX:
            return bytes.fromhex(text)
    except ValueError:
        pass
    raise IdentityError("a challenge answer must be a hex ECDSA signature")


@dataclass
class LinkChallenge:
    """One side's half of the exchange on one connection: its own nonce (sent), the peer's
    nonce (received), and the session binding. The peer gets one try only."""

    binding: bytes
    side: str  # "client" or "server": who this side is on the connection
    nonce: bytes = field(default_factory=new_challenge)
    peer_nonce: bytes | None = None
    _checked: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}")

    @property
    def peer_side(self) -> str:
        return SIDES[1 - SIDES.index(self.side)]

    def _context(self, side: str, signer_nonce: bytes) -> bytes:
        return self.binding + _field(side.encode()) + _field(signer_nonce)

    def answer(self, identity: NodeIdentity) -> bytes:
        """This side's proof: its key's signature over the peer's nonce, this session, its
        side and its own nonce."""
        if self.peer_nonce is None:
            raise IdentityError("no challenge to answer yet")
        return sign_challenge(identity, self.peer_nonce, self._context(self.side, self.nonce))

    def _spend(self) -> bytes:
        if self._checked or self.peer_nonce is None:
            raise IdentityError("this challenge was answered already, or never sent")
        self._checked = True
        return self.nonce

    def check_member(
        self,
        cert: bytes | x509.Certificate,
        ca_cert_pem: bytes,
        proof: bytes,
        *,
        revoked: Collection[str] = (),
    ) -> CertInfo:
        """The peer's answer, by the key of ``cert`` (DER or parsed), a certificate of the
        network whose CA is ``ca_cert_pem`` and not revoked; its ``CertInfo``."""
        nonce = self._spend()
        if isinstance(cert, bytes):
            cert = x509.load_der_x509_certificate(cert)
        return verify_node_identity(
            cert,
            ca_cert_pem,
            nonce,
            proof,
            self._context(self.peer_side, self.peer_nonce),
            revoked=revoked,
        )

    def check_key(self, public_key: ec.EllipticCurvePublicKey, proof: bytes) -> str:
        """The peer's answer by a bare key (a node's own identity key, no network
        certificate); its node id."""
        nonce = self._spend()
        try:
            return verify_key_possession(
                public_key, nonce, proof, self._context(self.peer_side, self.peer_nonce)
            )
        except IdentityError as exc:
            raise IdentityError(
                "the challenge answer does not verify (wrong key, or made for another "
                "connection: a replay or a relay)"
            ) from exc
