"""What the admin of a network asks its nodes over the control channel: how each one is
(``network_status``, with health from the running admin's monitor), its caps, who a node at an
address is, and a graceful leave. Plans and their application are in ``control.plans``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tiktrue.control.config_sync import SyncError
from tiktrue.control.join import JoinError
from tiktrue.control.local_service import local_control_address, poke_local_service
from tiktrue.control.network_manager import leave_network
from tiktrue.control.planner import PlanError
from tiktrue.model.errors import ModelError
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    config_path,
    read_config,
)
from tiktrue.security.auth_manager import IdentityError, SecurityError
from tiktrue.security.node_tls import NetworkCredentials

REPORT_TIMEOUT_S = 10.0  # a hung node must not hang ``network status``
# The refusals of the admin's operations, each with a message meant for people: the CLI
# prints it, the web dashboard shows it.
REFUSALS = (
    ConfigError,
    JoinError,
    SyncError,
    PlanError,
    ModelError,
    ControlError,
    PeerUnavailable,
    SecurityError,
)


def load(data_dir: Path, network_id: str) -> tuple[NetworkConfig, NetworkCredentials]:
    return read_config(config_path(data_dir, network_id)), NetworkCredentials.load(
        data_dir, network_id
    )


async def node_report(node, credentials: NetworkCredentials, *, probe: bool = False) -> dict:
    """``node_info`` of one node (plus a speed probe), or its state when it cannot answer."""
    if node.control_address is None:
        return {"node_id": node.node_id, "state": "unknown (no control port)"}
    try:
        async with ControlLink.to(node, credentials) as link:
            info = await link.call("node_info")
            if probe:
                info["bytes_per_ms"] = (await link.call("probe"))["bytes_per_ms"]
                info["link_ms"] = await _one_way_ms(link)
    except (PeerUnavailable, ControlError, IdentityError, OSError) as exc:
        return {"node_id": node.node_id, "state": "offline", "error": str(exc)}
    info["state"] = "online"
    return info


async def _one_way_ms(link: ControlLink, rounds: int = 5) -> float:
    """Half the median round trip of a tiny request: the hop's latency for the planner."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        await link.call("ping")
        times.append((time.perf_counter() - began) * 1000)
    return sorted(times)[len(times) // 2] / 2


async def network_status(
    data_dir: Path, network_id: str, *, probe: bool = False, without: set[str] = frozenset()
) -> dict:
    """Every node's state (``without`` the nodes not to ask: lost ones, say). Health
    (online/suspect/dead, last beat, RTT) comes from the running admin's monitor when it
    answers; nodes it holds dead are not asked directly (a hung one would not answer), the
    others are (with a time limit)."""
    config, credentials = load(data_dir, network_id)
    asked = [n for n in config.nodes if n.node_id not in without]
    health = await admin_health(data_dir, config, credentials)
    beats = (health or {}).get("nodes", {})

    async def report(node) -> dict:
        seen = beats.get(node.node_id)
        if seen is not None and seen["state"] == "dead":
            return {"node_id": node.node_id, "state": seen["state"]}
        try:
            return await asyncio.wait_for(
                node_report(node, credentials, probe=probe), None if probe else REPORT_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            return {"node_id": node.node_id, "state": "offline", "error": "no answer"}

    reports = await asyncio.gather(*(report(n) for n in asked))
    nodes = []
    for entry, report in zip(asked, reports, strict=True):
        network = report.get("networks", {}).get(network_id, {})
        seen = beats.get(entry.node_id) or {}
        nodes.append(
            {
                "node_id": entry.node_id,
                "name": entry.name,
                "address": entry.address,
                "control": entry.control_address,
                "role": entry.role,
                "state": _state(report, network),
                "blocks": entry.blocks,
                "resources": report.get("resources"),
                "caps": report.get("caps"),
                "rss_bytes": report.get("rss_bytes"),
                "bytes_per_ms": report.get("bytes_per_ms"),
                "link_ms": report.get("link_ms", 0.0),
                "sessions": network.get("sessions", 0),
                "version_held": network.get("version"),
                "health": seen.get("state") or _health(report),
                "last_beat_s": seen.get("last_beat_s"),
                "rtt_ms": seen.get("rtt_ms"),
                "stats": seen.get("stats"),
            }
        )
    return {
        "network_id": network_id,
        "name": config.name,
        "model_id": config.model_id,
        "version": config.version,
        "monitored": health is not None,
        "nodes": nodes,
    }


def _health(report: dict) -> str:
    """Without the admin's monitor: what a direct probe tells."""
    state = report.get("state", "offline")
    return state if state in ("online", "offline") else "unknown"


async def admin_health(
    data_dir: Path, config: NetworkConfig, credentials: NetworkCredentials
) -> dict | None:
    """The running admin's health view of the network (op ``health``), or ``None``."""
    admin = next((n for n in config.nodes if n.role == "admin"), None)
    if admin is None:
        return None
    address = admin.control_address
    if address is None and admin.node_id == credentials.identity.node_id:
        address = local_control_address(data_dir)
    if address is None:
        return None

    async def ask() -> dict:
        async with ControlLink(
            address, expected_node_id=admin.node_id, credentials=credentials
        ) as link:
            return await link.call("health", network_id=config.network_id)

    try:
        return await asyncio.wait_for(ask(), REPORT_TIMEOUT_S)
    except (PeerUnavailable, ControlError, IdentityError, OSError, asyncio.TimeoutError):
        return None


def _state(report: dict, network: dict) -> str:
    if report.get("state") != "online":
        return report.get("state", "offline")
    if network.get("serving"):
        return "serving"
    return network.get("waiting") or "idle"


async def set_caps(data_dir: Path, network_id: str, node_id: str, caps: dict) -> dict:
    config, credentials = load(data_dir, network_id)
    node = config.node(node_id)
    async with ControlLink.to(node, credentials) as link:
        return (await link.call("caps_set", network_id=network_id, caps=caps))["caps"]


def probe_announcement(host: str, port: int):
    """For discovery's manual addresses: ask a node's control channel who it is."""
    from tiktrue.control.discovery import NetworkInfo, NodeAnnouncement

    async def ask() -> dict:
        async with ControlLink(f"{host}:{port}", expected_node_id=None) as link:
            return await link.call("node_info")

    info = asyncio.run(ask())
    networks = {
        network_id: NetworkInfo(name=n["name"], role=n["role"], model_id=n["model_id"])
        for network_id, n in info["networks"].items()
    }
    return NodeAnnouncement(
        node_id=info["node_id"], host=host, control_port=port, networks=networks
    )


async def leave_gracefully(data_dir: Path, network_id: str) -> None:
    """This node leaves: the admin re-plans without it and moves its blocks, then it forgets
    the network. Its block server keeps serving until the new chain is in place."""
    config, credentials = load(data_dir, network_id)
    me = credentials.identity.node_id
    admin = next(n for n in config.nodes if n.role == "admin")
    if admin.node_id != me:
        async with ControlLink.to(admin, credentials) as link:
            await link.call("leave", network_id=network_id)
    leave_network(data_dir, network_id)
    await poke_local_service(data_dir)
