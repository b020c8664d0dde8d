"""TLS 1.3 mutual-TLS contexts and AES-256-GCM block encryption (seed 000, phase 6).

Every node-to-node link (WebSocket and HTTPS) uses these contexts: TLS 1.3 only (ECDHE key
exchange, so forward secrecy), both sides present a certificate, and the only trusted root is the
network's CA — never the system store. Model blocks travel (and may rest) encrypted with
``encrypt_block_transfer``; ``BlockCipher`` holds one network's block key for both.
"""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tiktrue.security.auth_manager import CertInfo, IdentityError, SecurityError, certificate_info

# A path to a PEM file, or the PEM itself as bytes (or as a str starting with "-----BEGIN").
PemSource: TypeAlias = str | os.PathLike[str] | bytes

BLOCK_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class BlockDecryptionError(SecurityError, ValueError):
    """An encrypted block was tampered with, or the key or associated data is wrong (a
    ``ValueError`` too: what ``model.store.Cipher.open`` raises)."""


# --- TLS -------------------------------------------------------------------------------------


def _is_inline_pem(source: PemSource) -> bool:
    return isinstance(source, bytes) or (
        isinstance(source, str) and source.lstrip().startswith("-----BEGIN")
    )


def _read_pem(source: PemSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and _is_inline_pem(source):
        return source.encode("ascii")
    return Path(source).read_bytes()


def _load_cert_chain(context: ssl.SSLContext, cert: PemSource, key: PemSource) -> None:
    if not _is_inline_pem(cert) and not _is_inline_pem(key):
        context.load_cert_chain(os.fspath(cert), os.fspath(key))  # type: ignore[arg-type]
        return
    # ssl only loads a chain from files: use owner-only temporaries (0o700 dir, 0o600 files)
    # that live only for the call.
    with tempfile.TemporaryDirectory(prefix="tiktrue-tls-") as tmp:
        paths = []
        for name, source in (("cert.pem", cert), ("key.pem", key)):
            fd, path = tempfile.mkstemp(prefix=name, dir=tmp)
            with os.fdopen(fd, "wb") as handle:
                handle.write(_read_pem(source))
            paths.append(path)
        context.load_cert_chain(paths[0], paths[1])


def _trust_only(context: ssl.SSLContext, ca_cert: PemSource) -> None:
    pem = _read_pem(ca_cert)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"network CA certificate is not valid PEM: {exc}") from exc
    if len(certs) != 1:
        raise IdentityError(f"expected exactly one network CA certificate, got {len(certs)}")
    context.load_verify_locations(cadata=pem.decode("ascii"))


def _base_context(
    protocol: int, cert: PemSource, key: PemSource, ca_cert: PemSource
) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    _load_cert_chain(context, cert, key)
    _trust_only(context, ca_cert)
    return context


def server_ssl_context(
    cert_pem_path: PemSource, key_pem_path: PemSource, ca_cert_path: PemSource
) -> ssl.SSLContext:
    """Server side of a node link: TLS 1.3 only, client certificate required, network CA only."""
    return _base_context(ssl.PROTOCOL_TLS_SERVER, cert_pem_path, key_pem_path, ca_cert_path)


def client_ssl_context(
    cert_pem_path: PemSource, key_pem_path: PemSource, ca_cert_path: PemSource
) -> ssl.SSLContext:
    """Client side of a node link: presents its certificate, checks the server's and its host."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert_pem_path, key_pem_path, ca_cert_path)
    context.check_hostname = True
    return context


def peer_certificate_info(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> CertInfo:
    """The peer's node id, role and network from a live, verified TLS connection.

    With asyncio: ``writer.get_extra_info("ssl_object")``.
    """
    if ssl_object is None:
        raise IdentityError("connection is not TLS")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("peer presented no certificate")
    return certificate_info(x509.load_der_x509_certificate(der))


# --- AES-256-GCM -----------------------------------------------------------------------------


def new_block_key() -> bytes:
    """A fresh random AES-256 key."""
    return secrets.token_bytes(BLOCK_KEY_BYTES)


def _aesgcm(key: bytes) -> AESGCM:
    if len(key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block key must be {BLOCK_KEY_BYTES} bytes (AES-256), got {len(key)}")
    return AESGCM(key)


def encrypt_block_transfer(data: bytes, key: bytes, associated_data: bytes = b"") -> bytes:
    """AES-256-GCM: returns ``nonce (12 bytes) || ciphertext || tag (16 bytes)``.

    ``associated_data`` is authenticated, not encrypted: bind the blob to what it is, e.g.
    ``f"{model_id}/{block}/{sha256}".encode()``, so a valid blob cannot be swapped for another.
    Nonces are random, so one key should seal well under 2**32 blobs; big blocks go in chunks
    (cryptography limits one call to < 2 GiB).
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + _aesgcm(key).encrypt(nonce, data, associated_data)


def decrypt_block_transfer(blob: bytes, key: bytes, associated_data: bytes = b"") -> bytes:
    """Open a blob made by ``encrypt_block_transfer``; raises ``BlockDecryptionError`` if bad."""
    aesgcm = _aesgcm(key)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise BlockDecryptionError(
            f"encrypted block is too short ({len(blob)} bytes) to hold a nonce and a tag"
        )
    try:
        return aesgcm.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise BlockDecryptionError(
            "encrypted block failed authentication: tampered data, wrong key "
            "or wrong associated data"
        ) from exc


class BlockCipher:
    """One network's AES-256-GCM block key: seals and opens chunks of blocks, in transfer
    and at rest (the ``Cipher`` that ``model.store`` expects)."""

    def __init__(self, key: bytes) -> None:
        self._aesgcm = _aesgcm(key)  # refuses a key of the wrong size now, not at first use
        self._key = key

    def seal(self, data: bytes, associated_data: bytes) -> bytes:
        return encrypt_block_transfer(data, self._key, associated_data)

    def open(self, blob: bytes, associated_data: bytes) -> bytes:
        return decrypt_block_transfer(blob, self._key, associated_data)
