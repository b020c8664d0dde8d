"""Network configs signed by the network's CA (DESIGN.md §6): signed on the way out, checked on
the way in.

The admin holds the CA key and signs every config it hands out (a join grant, a two-phase
push, the answer to a pull). Every other node takes a config only when its signature verifies
against the network's CA certificate it got when it joined; the version rules of
``config_sync`` then refuse an older one. So a node on the LAN that is not the admin cannot
change who is in a network, which blocks a node serves, or the revocation list, even with a
valid certificate of the network.
"""

from __future__ import annotations

from pathlib import Path

from tiktrue.protocol.network_config import ConfigError, NetworkConfig
from tiktrue.security.auth_manager import IdentityError, NetworkCA, sign_document, verify_document

CONFIG_KIND = "network-config"


class ConfigSignatureError(ConfigError):
    """A config that is not signed, or not by this network's CA (forged or altered)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def sign_config(config: NetworkConfig, ca: NetworkCA) -> NetworkConfig:
    """``config`` with the CA's signature over its canonical bytes (the admin's side)."""
    if ca.network_id != config.network_id:
        raise ConfigError(f"the CA of {ca.network_id} cannot sign a config of {config.network_id}")
    signature = sign_document(ca, CONFIG_KIND, config.canonical_bytes())
    return config.model_copy(update={"signature": signature.hex()})


def verify_config(config: NetworkConfig, ca_cert_pem: bytes) -> NetworkConfig:
    """Raises ``ConfigSignatureError`` unless the network's CA signed exactly this config."""
    if not config.signature:
        raise ConfigSignatureError(
            "unsigned_config",
            f"config v{config.version} of {config.network_id} is not signed by the network's "
            "CA; only the admin's signed configs are taken",
        )
    try:
        verify_document(ca_cert_pem, CONFIG_KIND, config.canonical_bytes(), _hex(config.signature))
    except IdentityError as exc:
        raise ConfigSignatureError(
            "bad_signature",
            f"config v{config.version} of {config.network_id} does not verify against the "
            "network's CA (forged or altered); refused",
        ) from exc
    return config


def verify_held_ca(data_dir: Path, config: NetworkConfig) -> NetworkConfig:
    """``verify_config`` against the CA certificate this node holds for the config's network."""
    ca = Path(data_dir) / "networks" / config.network_id / "ca_cert.pem"
    if not ca.is_file():
        raise ConfigSignatureError(
            "unknown_network", f"this node holds no CA certificate of {config.network_id}"
        )
    return verify_config(config, ca.read_bytes())


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""
