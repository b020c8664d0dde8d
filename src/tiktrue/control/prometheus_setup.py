"""``tiktrue ops prometheus --out DIR``: Prometheus for every network this node administers.

For each network: a fresh key and a read-only ``monitor`` certificate signed by the network's
CA (it reads ``/metrics`` and nothing else: every node and block link refuses it), the CA to
check the nodes' own certificates, and a scrape job; then ``DIR`` is remembered in
``<data>/monitoring.json`` so that the admin's node service keeps the targets current (see
``monitoring.prometheus_config``). Running it again makes new certificates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from tiktrue.monitoring.prometheus_config import (
    tls_files,
    update_settings,
    write_scrape_config,
)
from tiktrue.protocol.network_config import list_configs
from tiktrue.security.auth_manager import (
    MONITOR,
    NetworkCA,
    _private_pem,
    _write_private_file,
    node_id_for_public_key,
)
from tiktrue.security.node_tls import node_identity

MONITOR_CERT_DAYS = 365


@dataclass
class PrometheusSetup:
    folder: Path
    config: Path
    networks: list[str]


def administered(data_dir: Path) -> list[str]:
    """The networks whose CA this node holds (it is their admin)."""
    me = node_identity(data_dir).node_id
    return [
        c.network_id
        for c in list_configs(data_dir)
        if me in c.node_ids
        and c.node(me).role == "admin"
        and (Path(data_dir) / "networks" / c.network_id / "ca" / "ca_key.pem").is_file()
    ]


def issue_monitor_certificate(ca: NetworkCA, folder: Path) -> None:
    """A new key and ``monitor`` certificate of ``ca``'s network in ``folder``'s TLS files."""
    files = tls_files(folder, ca.network_id)
    files["key"].parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    node_id = node_id_for_public_key(key.public_key())
    cert = ca.generate_node_certificate(
        node_id, key.public_key(), MONITOR, hosts=("localhost",), days=MONITOR_CERT_DAYS
    )
    files["key"].unlink(missing_ok=True)
    _write_private_file(files["key"], _private_pem(key))  # owner-only
    files["cert"].write_bytes(cert)
    files["ca"].write_bytes(ca.cert_pem)


def setup_prometheus(data_dir: Path, folder: Path, interval_s: float = 15.0) -> PrometheusSetup:
    networks = administered(data_dir)
    if not networks:
        raise ValueError("this node administers no network: nothing for Prometheus to scrape")
    folder = Path(folder).absolute()
    for network_id in networks:
        ca = NetworkCA.load(Path(data_dir) / "networks" / network_id / "ca")
        issue_monitor_certificate(ca, folder)
    config = write_scrape_config(folder, networks, interval_s)
    update_settings(data_dir, prometheus_dir=str(folder))
    return PrometheusSetup(folder, config, networks)
