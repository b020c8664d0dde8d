"""A node's secrets for one network: the network CA, this node's certificate and key, and
the network's block key.

Files: ``<data>/identity/node_key.pem`` (one key per node, all networks) and
``<data>/networks/<network_id>/{ca_cert.pem, node_cert.pem, block_key}``.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tiktrue.security.auth_manager import (
    CertInfo,
    IdentityError,
    NodeIdentity,
    load_or_create_node_identity,
    node_id_for_public_key,
    verify_certificate,
)
from tiktrue.security.crypto_layer import BlockCipher, client_ssl_context, server_ssl_context

CA_CERT = "ca_cert.pem"
NODE_CERT = "node_cert.pem"
BLOCK_KEY = "block_key"  # hex, owner-only; fetched over mutual TLS once the node joined


def node_identity(data_dir: Path) -> NodeIdentity:
    return load_or_create_node_identity(Path(data_dir) / "identity")


@dataclass(frozen=True)
class NetworkCredentials:
    """What a node needs to open and accept mutual-TLS links in one network."""

    identity: NodeIdentity
    ca_cert: Path
    node_cert: Path
    info: CertInfo

    @classmethod
    def load(cls, data_dir: Path, network_id: str) -> NetworkCredentials:
        directory = Path(data_dir) / "networks" / network_id
        ca_cert, node_cert = directory / CA_CERT, directory / NODE_CERT
        if not ca_cert.is_file() or not node_cert.is_file():
            raise IdentityError(
                f"this node has no certificate for network {network_id} "
                f"(expected {ca_cert} and {node_cert}); join the network first"
            )
        identity = node_identity(data_dir)
        info = verify_certificate(node_cert.read_bytes(), ca_cert.read_bytes())
        if info.node_id != identity.node_id:
            raise IdentityError(
                f"{node_cert} was issued to node {info.node_id}, this node is {identity.node_id}"
            )
        return cls(identity, ca_cert, node_cert, info)

    @property
    def cert_der(self) -> bytes:
        """This node's certificate (DER), as its TLS peers see it: read at each call (once
        per connection), since a renewal replaces it in the contexts made before."""
        return pem_to_der(self.node_cert.read_bytes())

    @cached_property
    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    def server_context(self) -> ssl.SSLContext:
        context = server_ssl_context(self.node_cert, self.identity.key_path, self.ca_cert)
        return _keep_current(context, self.node_cert)

    def client_context(self) -> ssl.SSLContext:
        context = client_ssl_context(self.node_cert, self.identity.key_path, self.ca_cert)
        return _keep_current(context, self.node_cert)


# Every TLS context made with a node certificate, by certificate file: a renewal loads the new
# certificate into each of them (``reload_certificate``), so block servers, links and the
# gateway present it on their next connections without restarting (open ones go on).
_LIVE: dict[Path, weakref.WeakSet[ssl.SSLContext]] = {}


def _keep_current(context: ssl.SSLContext, cert_path: Path) -> ssl.SSLContext:
    _LIVE.setdefault(Path(cert_path).resolve(), weakref.WeakSet()).add(context)
    return context


def reload_certificate(data_dir: Path, network_id: str) -> int:
    """After ``node_cert.pem`` of a network was replaced (a renewal): load it into every live
    context made with it; returns how many."""
    cert = Path(data_dir) / "networks" / network_id / NODE_CERT
    key = node_identity(data_dir).key_path
    contexts = list(_LIVE.get(cert.resolve(), ()))
    for context in contexts:
        context.load_cert_chain(cert, key)
    return len(contexts)


def load_block_key(data_dir: Path, network_id: str) -> bytes | None:
    """The network's AES-256-GCM block key, or None when this node holds none."""
    path = Path(data_dir) / "networks" / network_id / BLOCK_KEY
    if not path.is_file():
        return None
    return bytes.fromhex(path.read_text("utf-8").strip())


def block_keyring(data_dir: Path) -> Callable[[str], BlockCipher | None]:
    """Network id -> the cipher of its block key (None: no key here), for sealed blocks."""

    def cipher(network_id: str) -> BlockCipher | None:
        key = load_block_key(data_dir, network_id)
        return BlockCipher(key) if key is not None else None

    return cipher


def install_certificate(data_dir: Path, network_id: str, ca_cert_pem: bytes, node_cert_pem: bytes):
    """Store the network CA and this node's certificate (after the admin issued it; a
    renewal replaces the certificate whole: a reader never sees half of one)."""
    directory = Path(data_dir) / "networks" / network_id
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in ((CA_CERT, ca_cert_pem), (NODE_CERT, node_cert_pem)):
        partial = directory / f"{name}.partial"
        partial.write_bytes(data)
        partial.replace(directory / name)


# --- the control channel: reachable before a node has joined any network ------------------
#
# A node's control server presents a self-signed certificate of its own identity key. Clients
# do not trust it through a CA: they pin it, checking that the key hashes to the node id they
# expect (from a join token, a discovery announcement or the network config). Clients that act
# for a network (the admin pushing config or blocks) present their network certificate, which
# the server verifies against the CAs of the networks it has joined.

CONTROL_CERT = "control_cert.pem"


def _self_signed(identity: NodeIdentity) -> bytes:
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(identity.private_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def control_certificate(data_dir: Path) -> Path:
    """This node's self-signed control-channel certificate (made on first use)."""
    identity = node_identity(data_dir)
    cert_path = identity.directory / CONTROL_CERT
    if not cert_path.is_file():
        cert_path.write_bytes(_self_signed(identity))
    return cert_path


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def control_server_context(data_dir: Path) -> ssl.SSLContext:
    identity = node_identity(data_dir)
    cert_path = control_certificate(data_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_path, identity.key_path)
    cas = sorted((Path(data_dir) / "networks").glob(f"*/{CA_CERT}"))
    for ca in cas:
        context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_OPTIONAL if cas else ssl.CERT_NONE
    return context


def control_client_context(credentials: NetworkCredentials | None = None) -> ssl.SSLContext:
    """Client side of the control channel; the server is pinned by node id, not by a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if credentials is not None:
        context.load_cert_chain(credentials.node_cert, credentials.identity.key_path)
    return context


def peer_node_id(ssl_object) -> str:
    """The node id of the key the peer proved it holds in the TLS handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("the peer presented no certificate")
    return node_id_for_public_key(x509.load_der_x509_certificate(der).public_key())
