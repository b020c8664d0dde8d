"""``network_manager``: a network's files on this PC: create one, its keys, list and forget.

State lives in files: ``<data>/network_config_<id>.json`` and ``<data>/networks/<id>/`` holding
the CA certificate, this node's certificate, the network's block key, and on the admin the CA
key (``ca/``). Joining lives in ``tiktrue.control.join`` (tokens, requests, grants);
discovery in ``tiktrue.control.discovery``; changes to a running network's config go through
its admin's one writer (``tiktrue.control.config_writer``).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

from tiktrue.control.config_signing import sign_config
from tiktrue.model.store import BlockStore
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    NodeEntry,
    config_path,
    list_configs,
    network_dir,
    write_config,
)
from tiktrue.security.auth_manager import NetworkCA, create_network_ca
from tiktrue.security.crypto_layer import new_block_key
from tiktrue.security.node_tls import (
    BLOCK_KEY,
    install_certificate,
    load_block_key,
    node_identity,
)


class NotAdmin(ConfigError):
    """This node is not the admin of the network: it holds no CA key."""

    code = "not_admin"


class NoBlockKey(ConfigError):
    """This node holds no block key of the network (it never got one)."""

    code = "no_block_key"


# --- the admin's side ---------------------------------------------------------------------


def create_network(
    data_dir: Path,
    name: str,
    store: BlockStore,
    *,
    host: str = "127.0.0.1",
    port: int = 7480,
    control_port: int | None = None,
    network_id: str | None = None,
    auto_plan: bool = True,
    backup_nodes: int = 0,
    encrypt_at_rest: bool = False,
) -> NetworkConfig:
    """Make a network administered by this node; at first this node serves every block.
    ``encrypt_at_rest``: workers keep the blocks pushed to them sealed with the network key."""
    data_dir = Path(data_dir)
    network_id = network_id or f"net-{uuid.uuid4().hex[:8]}"
    if config_path(data_dir, network_id).exists():
        raise ConfigError(f"network {network_id} already exists")
    identity = node_identity(data_dir)
    folder = network_dir(data_dir, network_id)
    ca = create_network_ca(network_id, folder / "ca")
    cert = ca.generate_node_certificate(
        identity.node_id, identity.public_key, "admin", hosts=node_cert_hosts(host)
    )
    install_certificate(data_dir, network_id, ca.cert_pem, cert)
    install_block_key(data_dir, network_id, new_block_key())
    config = NetworkConfig(
        network_id=network_id,
        name=name,
        model_id=store.model_id,
        model_chain_order=store.manifest.model_chain_order,
        port=port,
        auto_plan=auto_plan,
        backup_nodes=backup_nodes,
        encrypt_at_rest=encrypt_at_rest,
        nodes=[
            NodeEntry(
                node_id=identity.node_id,
                role="admin",
                host=host,
                port=port,
                control_port=control_port,
                name=name_of_this_pc(),
                blocks=list(store.manifest.model_chain_order),
            )
        ],
    )
    config = sign_config(config, ca)
    write_config(data_dir, config)
    return config


def name_of_this_pc() -> str:
    import platform

    return platform.node() or "this PC"


def node_cert_hosts(host: str) -> tuple[str, ...]:
    """What a node certificate names: the node's address, and this PC's loopback names (its
    own programs reach its gateway there)."""
    return tuple(dict.fromkeys([host, "127.0.0.1", "localhost"]))


def _write_secret(path: Path, text: str) -> None:
    path.write_text(text, "utf-8")
    with contextlib.suppress(OSError):  # Windows: the user profile is private already
        path.chmod(0o600)


def install_block_key(data_dir: Path, network_id: str, key: bytes) -> None:
    """The network's AES-256-GCM block key, readable by this user only."""
    _write_secret(network_dir(data_dir, network_id) / BLOCK_KEY, key.hex())


def block_key(data_dir: Path, network_id: str) -> bytes:
    key = load_block_key(data_dir, network_id)
    if key is None:
        raise NoBlockKey(f"this node holds no block key for network {network_id}")
    return key


def admin_ca(data_dir: Path, network_id: str) -> NetworkCA:
    folder = Path(data_dir) / "networks" / network_id / "ca"
    if not (folder / "ca_key.pem").is_file():
        raise NotAdmin(f"this node is not the admin of network {network_id}")
    return NetworkCA.load(folder)


def list_joined_networks(data_dir: Path) -> list[NetworkConfig]:
    """The networks this node belongs to."""
    node_id = node_identity(data_dir).node_id
    return [c for c in list_configs(data_dir) if node_id in {n.node_id for n in c.nodes}]


def leave_network(data_dir: Path, network_id: str) -> None:
    """Forget a network here (its certificate, key and config); the admin drops the node."""
    import shutil

    config_path(data_dir, network_id).unlink(missing_ok=True)
    shutil.rmtree(Path(data_dir) / "networks" / network_id, ignore_errors=True)
