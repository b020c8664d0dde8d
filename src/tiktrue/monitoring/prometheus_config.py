"""Prometheus, ready for this admin's networks (``tiktrue ops prometheus --out DIR``):

- ``DIR/prometheus.yml``: one scrape job per network, HTTPS with the network's CA and a
  read-only ``monitor`` certificate of that network (``DIR/tls/<network>/``), its targets read
  from ``DIR/targets/<network>.json`` (file-based service discovery);
- the targets files, which the admin's running node service rewrites whenever a PC joins,
  leaves or moves its metrics port (``write_targets``, only when they changed): every node's
  metrics address as its heartbeats tell it, labelled with ``network``, ``node`` and ``role``.
  A node that runs a gateway is scraped on the gateway's port over HTTP (``__scheme__``):
  Prometheus on the admin's PC reads it as this PC's own caller.

Paths in the config are relative to ``DIR`` (Prometheus resolves them from the config file),
so the folder can move. The settings file ``<data>/monitoring.json`` remembers ``DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tiktrue.paths import write_text_atomic

CONFIG_FILE = "prometheus.yml"
TARGETS_DIR = "targets"
TLS_DIR = "tls"
SETTINGS_FILE = "monitoring.json"
JOB_PREFIX = "tiktrue"


def settings_path(data_dir: Path) -> Path:
    return Path(data_dir) / SETTINGS_FILE


def read_settings(data_dir: Path) -> dict:
    """The node's monitoring settings (Prometheus folder, alert thresholds); {} when unset
    or unreadable (the defaults)."""
    path = settings_path(data_dir)
    try:
        return json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def update_settings(data_dir: Path, **changes) -> dict:
    settings = {**read_settings(data_dir), **changes}
    write_text_atomic(settings_path(data_dir), json.dumps(settings, indent=2))
    return settings


def targets_file(folder: Path, network_id: str) -> Path:
    return Path(folder) / TARGETS_DIR / f"{network_id}.json"


def tls_files(folder: Path, network_id: str) -> dict[str, Path]:
    base = Path(folder) / TLS_DIR / network_id
    return {"ca": base / "ca.pem", "cert": base / "monitor.pem", "key": base / "monitor-key.pem"}


def scrape_config(network_ids: list[str], interval_s: float = 15.0) -> dict:
    """The Prometheus configuration: a job per network (paths relative to its folder)."""
    jobs = []
    for network_id in sorted(network_ids):
        tls = {k: str(v) for k, v in tls_files(Path("."), network_id).items()}
        jobs.append(
            {
                "job_name": f"{JOB_PREFIX}-{network_id}",
                "scheme": "https",
                "metrics_path": "/metrics",
                # a node's own ``network`` label wins (a gateway's port serves every network
                # of its node); series without one get the target's
                "honor_labels": True,
                "tls_config": {
                    "ca_file": tls["ca"],
                    "cert_file": tls["cert"],
                    "key_file": tls["key"],
                    "min_version": "TLS13",
                },
                "file_sd_configs": [
                    {
                        "files": [str(targets_file(Path("."), network_id))],
                        "refresh_interval": "30s",
                    }
                ],
            }
        )
    seconds = f"{max(1, round(interval_s))}s"
    return {
        "global": {"scrape_interval": seconds, "evaluation_interval": seconds},
        "scrape_configs": jobs,
    }


def write_scrape_config(folder: Path, network_ids: list[str], interval_s: float = 15.0) -> Path:
    folder = Path(folder)
    (folder / TARGETS_DIR).mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    header = (
        "# TikTrue: written by `tiktrue ops prometheus`; the targets files are kept current\n"
        "# by the admin's node service as PCs join and leave.\n"
    )
    text = header + yaml.safe_dump(scrape_config(network_ids, interval_s), sort_keys=False)
    write_text_atomic(path, text)
    for network_id in network_ids:  # Prometheus wants the files to exist
        if not targets_file(folder, network_id).is_file():
            write_targets(folder, network_id, [])
    return path


def target_groups(network_id: str, nodes: list[dict]) -> list[dict]:
    """File-SD groups for a network's nodes (``node_id``, ``role``, ``metrics``: the address
    its heartbeat tells, ``{"scheme", "host", "port"}``; nodes without one are left out)."""
    groups = []
    for node in sorted(nodes, key=lambda n: n["node_id"]):
        address = node.get("metrics")
        if not address or not address.get("port"):
            continue
        host = str(address["host"])
        host = f"[{host}]" if ":" in host else host
        groups.append(
            {
                "targets": [f"{host}:{int(address['port'])}"],
                "labels": {
                    "network": network_id,
                    "node": node["node_id"],
                    "role": node.get("role") or "",
                    "__scheme__": address.get("scheme", "https"),
                },
            }
        )
    return groups


def write_targets(folder: Path, network_id: str, groups: list[dict]) -> bool:
    """Write the network's targets file when it changed; returns whether it was written."""
    path = targets_file(folder, network_id)
    text = json.dumps(groups, indent=2) + "\n"
    if path.is_file() and path.read_text("utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return True
