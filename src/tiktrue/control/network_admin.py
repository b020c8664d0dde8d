"""What the admin of a network does over the control channel: ask every node how it is, plan
the spans, push blocks and the new config, set caps. The CLI (and later the web UI) call these.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from tiktrue.control.config_sync import SyncReport, broadcast_config_updates
from tiktrue.control.distributor import PushProgress, push_blocks
from tiktrue.control.network_manager import JoinError
from tiktrue.control.planner import (
    ModelProfile,
    NodeCapacity,
    Plan,
    PlanError,
    plan_with_backups,
)
from tiktrue.model.errors import ModelError
from tiktrue.model.store import BlockStore
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.node.resources import ram_cap
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    Revoked,
    config_path,
    read_config,
)
from tiktrue.security.auth_manager import IdentityError, SecurityError
from tiktrue.security.node_tls import NetworkCredentials, node_identity

REPORT_TIMEOUT_S = 10.0  # a hung node must not hang ``network status``
# The refusals of the admin's operations, each with a message meant for people: the CLI
# prints it, the web dashboard shows it.
REFUSALS = (
    ConfigError,
    JoinError,
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


def local_control_address(data_dir: Path) -> str | None:
    """Where the node service running from this data dir listens (its run file)."""
    import json

    from tiktrue.paths import run_file

    path = run_file(data_dir)
    if not path.is_file():
        return None
    return json.loads(path.read_text("utf-8")).get("control")


def _state(report: dict, network: dict) -> str:
    if report.get("state") != "online":
        return report.get("state", "offline")
    if network.get("serving"):
        return "serving"
    return network.get("waiting") or "idle"


def capacities(status: dict) -> list[NodeCapacity]:
    """What each online node can give, under its caps."""
    out = []
    for node in status["nodes"]:
        resources, caps = node.get("resources"), node.get("caps") or {}
        down = node["state"] in ("offline", "suspect", "dead")
        if down or not resources or not node.get("bytes_per_ms"):
            continue
        ram = ram_cap(caps.get("ram_bytes"), resources["ram_total_bytes"])
        disk = caps.get("disk_bytes") or int(resources["disk_free_bytes"] * 0.9)
        out.append(
            NodeCapacity(
                node_id=node["node_id"],
                ram_bytes=ram,
                disk_bytes=disk,
                bytes_per_ms=node["bytes_per_ms"],
                link_ms=node.get("link_ms") or 0.0,
            )
        )
    return out


def with_caps(status: dict, caps: dict[str, dict]) -> dict:
    """``status`` as if the nodes in ``caps`` (node id -> ``NodeCaps`` fields) had those caps:
    a plan preview tries caps on one measurement before they are set on the nodes."""
    return {
        **status,
        "nodes": [
            {**node, "caps": {**(node.get("caps") or {}), **caps[node["node_id"]]}}
            if node["node_id"] in caps
            else node
            for node in status["nodes"]
        ],
    }


def plan_from_status(
    data_dir: Path,
    network_id: str,
    status: dict,
    *,
    overrides: dict[str, int] | None = None,
    context_tokens: int | None = None,
) -> Plan:
    """Plan the spans on the nodes as ``network_status(probe=True)`` measured them, holding
    back the network's backup nodes where it can. ``context_tokens``: the KV cache to reserve
    on every node (default: what the admin chose before, else as much as the nodes' memory
    allows, up to the model's own; applying the plan records it).
    No I/O but the local store's manifest."""
    config, credentials = load(data_dir, network_id)
    if context_tokens is None and not config.context_auto:  # the admin's choice stays
        context_tokens = config.context_tokens
    store = BlockStore(Path(data_dir) / "models" / config.model_id)
    model = ModelProfile.from_manifest(store.manifest, store.config())
    return plan_with_backups(
        model,
        capacities(status),
        config.backup_nodes,
        keep_first=credentials.identity.node_id,
        context_tokens=context_tokens,
        overrides=overrides,
    )


async def make_plan(
    data_dir: Path,
    network_id: str,
    *,
    overrides: dict[str, int] | None = None,
    context_tokens: int | None = None,
    without: set[str] = frozenset(),
) -> tuple[Plan, dict]:
    """Measure every node (``without`` those leaving or lost) and plan the spans
    (``plan_from_status``)."""
    status = await network_status(data_dir, network_id, probe=True, without=without)
    plan = plan_from_status(
        data_dir, network_id, status, overrides=overrides, context_tokens=context_tokens
    )
    return plan, status


async def apply_plan(
    data_dir: Path,
    network_id: str,
    plan: Plan,
    *,
    progress: Callable[[PushProgress], None] | None = None,
    remove: set[str] = frozenset(),
    lost: set[str] = frozenset(),
    revoke: list[Revoked] = (),
) -> NetworkConfig:
    """Push every node the blocks of its new span (and each backup its replica), then the new
    config to every node: without the nodes in ``remove``, which are leaving (and on the
    revocation list, the ``revoke`` ones); the ``lost`` ones stay members (they pull the
    config when they return) but are not asked now."""
    config, credentials = load(data_dir, network_id)
    store = BlockStore(Path(data_dir) / "models" / config.model_id)
    by_id = {n.node_id: n for n in config.nodes}
    me = credentials.identity.node_id
    holds = {**plan.assignments, **plan.backups}
    for node_id, blocks in holds.items():
        if node_id != me:
            await push_blocks(
                data_dir, network_id, store, by_id[node_id], blocks, progress=progress
            )
    nodes = [
        n.model_copy(update={"blocks": list(holds.get(n.node_id, [])), "role": _role(n, plan)})
        for n in config.nodes
        if n.node_id not in remove
    ]
    new = NetworkConfig.model_validate(
        {
            **config.model_dump(),
            "nodes": [n.model_dump() for n in nodes],
            "version": config.version + 1,
            "context_tokens": plan.context_tokens,
            "context_auto": plan.context_auto,
            "revoked": [*config.revoked, *revoke],
        }
    )
    await push_config(data_dir, new, credentials, skip=lost)
    return new


async def remove_node(
    data_dir: Path, network_id: str, node_id: str, *, revoke: bool, reason: str = ""
) -> NetworkConfig:
    """The admin drops ``node_id`` from the network: when it holds blocks the network is
    planned again without it first (its span moves to the others), else a config without it
    is pushed. With ``revoke`` (``tiktrue network remove``) its certificates go on the
    revocation list of that signed config: every node refuses them as soon as it commits the
    config, on open connections too. Without it (a node leaving by itself) it may join
    again."""
    config, credentials = load(data_dir, network_id)
    leaving = config.node(node_id)
    if leaving.role == "admin":
        raise ConfigError(f"node {node_id} is the admin of {network_id}; it cannot be removed")
    revoked = [Revoked(node_id=node_id, reason=reason[:200])] if revoke else []
    if leaving.blocks:
        plan, _ = await make_plan(data_dir, network_id, without={node_id})
        return await apply_plan(data_dir, network_id, plan, remove={node_id}, revoke=revoked)
    new = NetworkConfig.model_validate(
        {
            **config.model_dump(),
            "nodes": [n.model_dump() for n in config.nodes if n.node_id != node_id],
            "version": config.version + 1,
            "revoked": [*config.revoked, *revoked],
        }
    )
    await push_config(data_dir, new, credentials)
    return new


def _role(node, plan: Plan) -> str:
    """The admin stays admin; a node holding a replica is a backup, one in the chain a worker."""
    if node.role == "admin":
        return "admin"
    if node.node_id in plan.backups:
        return "backup"
    return "worker" if node.node_id in plan.assignments else node.role


async def push_config(
    data_dir: Path,
    config: NetworkConfig,
    credentials,
    *,
    skip: set[str] = frozenset(),
    **options,
) -> SyncReport:
    """Switch every node to ``config`` (two-phase, acknowledged, retried: see ``config_sync``;
    the nodes in ``skip`` are lost: not asked now, they pull the config when they return),
    then this node's own service."""
    report = await broadcast_config_updates(data_dir, config, credentials, skip=skip, **options)
    await poke_local_service(data_dir)
    return report


async def poke_local_service(data_dir: Path) -> bool:
    """Ask the node service running from this data dir to re-read its configs (as its owner:
    this process can read the node's key)."""
    control = local_control_address(data_dir)
    if not control:
        return False
    identity = node_identity(data_dir)
    try:
        async with ControlLink(control, expected_node_id=identity.node_id, owner=identity) as link:
            await link.call("reload")
    except (PeerUnavailable, ControlError, IdentityError, OSError):
        return False
    return True


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
    from tiktrue.control.network_manager import leave_network

    config, credentials = load(data_dir, network_id)
    me = credentials.identity.node_id
    admin = next(n for n in config.nodes if n.role == "admin")
    if admin.node_id != me:
        async with ControlLink.to(admin, credentials) as link:
            await link.call("leave", network_id=network_id)
    leave_network(data_dir, network_id)
    await poke_local_service(data_dir)
