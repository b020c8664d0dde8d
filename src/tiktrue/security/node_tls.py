"""A node's TLS material for one network: the network CA, this node's certificate and key.

Files: ``<data>/identity/node_key.pem`` (one key per node, all networks) and
``<data>/networks/<network_id>/{ca_cert.pem, node_cert.pem}``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from tiktrue.security.auth_manager import (
    CertInfo,
    IdentityError,
    NodeIdentity,
    load_or_create_node_identity,
    verify_certificate,
)
from tiktrue.security.crypto_layer import client_ssl_context, server_ssl_context

CA_CERT = "ca_cert.pem"
NODE_CERT = "node_cert.pem"


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

    def server_context(self) -> ssl.SSLContext:
        return server_ssl_context(self.node_cert, self.identity.key_path, self.ca_cert)

    def client_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.node_cert, self.identity.key_path, self.ca_cert)


def install_certificate(data_dir: Path, network_id: str, ca_cert_pem: bytes, node_cert_pem: bytes):
    """Store the network CA and this node's certificate (after the admin issued it)."""
    directory = Path(data_dir) / "networks" / network_id
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CA_CERT).write_bytes(ca_cert_pem)
    (directory / NODE_CERT).write_bytes(node_cert_pem)
