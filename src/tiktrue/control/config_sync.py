"""Config sync (DESIGN.md §7): a new config reaches every node in two phases; nodes that were
away catch up by pulling it from the admin when they return.

Every config the admin sends is signed by the network's CA (``config_signing``); a node takes
none that does not verify. Phase 1, ``config_prepare``: each node checks the config (signed,
newer than what it holds, sent by the network's admin) and that it holds, verified, the
blocks of its new span, then stages it. Phase 2, ``config_commit``: each node activates the
staged version. A refusal in phase 1 aborts the switch everywhere, so no node runs a config
whose chain lacks blocks. Every call is acknowledged and retried with backoff; both phases are
idempotent, so a retry whose first reply was lost does no harm. A node that cannot be reached
is left ``pending``: it pulls on return.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue.control.config_signing import ConfigSignatureError, sign_config, verify_held_ca
from tiktrue.control.network_manager import admin_ca
from tiktrue.model.store import MANIFEST, BlockStore
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    NodeEntry,
    config_path,
    read_config,
    write_config,
)
from tiktrue.security.auth_manager import IdentityError
from tiktrue.security.node_tls import NetworkCredentials, block_keyring

log = logging.getLogger("tiktrue.config_sync")

UNREACHABLE = (PeerUnavailable, IdentityError, OSError, asyncio.TimeoutError)


class SyncError(Exception):
    """A config switch that did not happen (nothing was committed); ``report`` says who
    refused and why."""

    def __init__(self, code: str, message: str, report: SyncReport | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.report = report


class SyncRefused(Exception):
    """A node's answer to a config it will not take (stale, missing blocks, not prepared)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SyncReport:
    """What a broadcast did, per node."""

    version: int
    committed: list[str] = field(default_factory=list)  # acknowledged: runs the new config
    pending: dict[str, str] = field(default_factory=dict)  # unreachable: pulls on return
    refused: dict[str, str] = field(default_factory=dict)  # refused phase 1: switch aborted
    attempts: dict[str, dict[str, int]] = field(default_factory=dict)  # op -> node -> calls

    @property
    def complete(self) -> bool:
        return not self.pending and not self.refused


# --- which config wins --------------------------------------------------------------------


def config_digest(config: NetworkConfig) -> str:
    """sha256 of the canonical JSON: the same on every node for the same content (the
    signature aside: ECDSA signatures of the same content differ)."""
    return hashlib.sha256(config.canonical_bytes()).hexdigest()


def handle_config_conflicts(
    ours: NetworkConfig | None,
    theirs: NetworkConfig,
    *,
    alert: Callable[[str], None] | None = None,
) -> NetworkConfig:
    """The config a node keeps of two from the network's admin (the caller checks that: a
    push by its certificate, a pull over the link pinned to its node id).

    The higher version wins. Equal versions with different content should not happen (one
    admin, one counter) but can, e.g. a CLI re-plan racing the node service: the one whose
    canonical JSON has the smaller sha256 wins, the same on every node whatever the order in
    which they arrive, and a warning is raised."""
    if ours is None:
        return theirs
    if ours.network_id != theirs.network_id:
        raise ConfigError(f"config of {theirs.network_id} offered for {ours.network_id}")
    if ours.version != theirs.version:
        return theirs if theirs.version > ours.version else ours
    mine, other = config_digest(ours), config_digest(theirs)
    if mine == other:
        return ours
    winner = ours if mine < other else theirs
    message = (
        f"config conflict in network {ours.network_id}: two different configs carry version "
        f"{ours.version} (sha256 {mine[:12]} here, {other[:12]} offered); keeping "
        f"{config_digest(winner)[:12]} (the smaller sha256), as every node does"
    )
    log.warning(message)
    if alert is not None:
        alert(message)
    return winner


def held_config(data_dir: Path, network_id: str) -> NetworkConfig | None:
    path = config_path(data_dir, network_id)
    return read_config(path) if path.exists() else None


def is_newer(current: NetworkConfig | None, offered: NetworkConfig, *, alert=None) -> bool:
    """Whether a node should take ``offered`` over what it holds (conflicts resolved)."""
    if current is None:
        return True
    winner = handle_config_conflicts(current, offered, alert=alert)
    return winner is offered and config_digest(offered) != config_digest(current)


# --- a node's side ------------------------------------------------------------------------


def missing_blocks(data_dir: Path, config: NetworkConfig, node_id: str) -> list[str]:
    """The blocks of ``node_id``'s span in ``config`` that this data dir does not hold verified
    (hashes the span's files: call it off the event loop)."""
    try:
        entry = config.node(node_id)
    except ConfigError:
        return []  # not in the network any more: it serves nothing
    root = Path(data_dir) / "models" / config.model_id
    if not entry.blocks:
        return []
    if not (root / MANIFEST).is_file():
        return list(entry.blocks)
    store = BlockStore(root, keyring=block_keyring(data_dir))
    known = store.manifest.blocks
    return [name for name in entry.blocks if name not in known or not _holds(store, name)]


_VERIFIED: dict[tuple, bool] = {}  # (path, size, mtime, sha256) -> verified: once per version


def _holds(store: BlockStore, name: str) -> bool:
    """The block's file verifies. Checked once per file version: prepares come on the
    failover path, where every second counts."""
    path = store.block_file(name)
    if not path.is_file():
        return False
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, store.manifest.blocks[name].sha256)
    if key not in _VERIFIED:
        _VERIFIED[key] = store.check_block(name) is None
    return _VERIFIED[key]


async def check_prepare(
    data_dir: Path, node_id: str, offered: NetworkConfig, *, alert=None
) -> bool:
    """Phase 1 on a node: raises ``SyncRefused`` for a config it must not take (not signed by
    the network's CA, or older); returns False when it holds that very config already
    (nothing to stage), True when it may stage it."""
    try:
        verify_held_ca(data_dir, offered)
    except ConfigSignatureError as exc:
        raise SyncRefused(exc.code, str(exc)) from exc
    current = held_config(data_dir, offered.network_id)
    if current is not None and config_digest(current) == config_digest(offered):
        return False
    if not is_newer(current, offered, alert=alert):
        raise SyncRefused(
            "stale_config",
            f"this node holds version {current.version} of {offered.network_id} already",
        )
    missing = await asyncio.to_thread(missing_blocks, data_dir, offered, node_id)
    if missing:
        raise SyncRefused(
            "missing_blocks",
            f"node {node_id} does not hold verified blocks {', '.join(missing)} of its new span",
        )
    return True


def with_control_port(config: NetworkConfig, node_id: str, port: int) -> NetworkConfig | None:
    """``config`` with ``node_id``'s control channel on ``port`` (a node that restarted on
    another port); None when it is there already or the node is not a member. Only the port
    moves: the host is also the node's block-server address. (A new version: ``ControlPort``
    through the network's writer.)"""
    try:
        entry = config.node(node_id)
    except ConfigError:
        return None
    if entry.control_port == port:
        return None
    nodes = [
        n.model_copy(update={"control_port": port}) if n.node_id == node_id else n
        for n in config.nodes
    ]
    return NetworkConfig.model_validate(
        {**config.model_dump(), "nodes": [n.model_dump() for n in nodes]}
    )


@dataclass(frozen=True)
class ControlPort:
    """A node's control channel moved to ``port``: a change for the network's writer."""

    node_id: str
    port: int

    def apply(self, current: NetworkConfig) -> NetworkConfig | None:
        return with_control_port(current, self.node_id, self.port)

    def describe(self) -> str:
        return f"node {self.node_id}'s control port is {self.port} now"


async def pull_config(
    data_dir: Path,
    network_id: str,
    *,
    control_address: str | None = None,
    admin_address: str | None = None,
    alert: Callable[[str], None] | None = None,
) -> tuple[NetworkConfig, bool]:
    """A member asks its admin for the current config (telling it where its own control
    channel listens now) and installs it when it wins over the one held. ``admin_address``
    overrides the config's (the admin restarted on another port: see ``find_admin``).
    Returns the config now held and whether it changed; raises ``PeerUnavailable`` when the
    admin is away."""
    current = read_config(config_path(data_dir, network_id))
    credentials = NetworkCredentials.load(data_dir, network_id)
    admin = next((n for n in current.nodes if n.role == "admin"), None)
    if admin is None or admin.node_id == credentials.identity.node_id:
        return current, False
    link = (
        ControlLink(admin_address, expected_node_id=admin.node_id, credentials=credentials)
        if admin_address
        else ControlLink.to(admin, credentials)
    )
    async with link:  # pinned to the admin's node id, whatever the address
        reply = await link.call(
            "config_pull",
            network_id=network_id,
            version=current.version,
            control=control_address,
        )
    offered = NetworkConfig.model_validate(reply["config"])
    if offered.network_id != network_id:
        raise ConfigError(f"the admin answered with network {offered.network_id}")
    verify_held_ca(data_dir, offered)  # pinned to the admin's id, and signed by the CA
    if not is_newer(current, offered, alert=alert):
        return current, False
    write_config(data_dir, offered)
    return offered, True


def find_admin(
    data_dir: Path, network_id: str, *, timeout: float = 10.0, interfaces=None
) -> str | None:
    """Where the network's admin announces its control channel on the LAN now (it may have
    restarted on another port while this node was away too); None when not heard. Blocking:
    call it in a thread. The link to the address found is still pinned to the admin's id."""
    from tiktrue.control.discovery import discover_networks

    config = read_config(config_path(data_dir, network_id))
    admin = next((n for n in config.nodes if n.role == "admin"), None)
    if admin is None:
        return None

    def heard(nodes) -> bool:
        return any(n.node_id == admin.node_id for n in nodes)

    try:
        nodes = discover_networks(timeout, interfaces=interfaces, until=heard)
    except Exception as exc:  # a LAN without multicast: only the config's address is left
        log.info("cannot browse the LAN for the admin of %s: %s", network_id, exc)
        return None
    found = next((n for n in nodes if n.node_id == admin.node_id), None)
    return f"{found.host}:{found.control_port}" if found else None


# --- the admin's side ---------------------------------------------------------------------


async def broadcast_config_updates(
    data_dir: Path,
    config: NetworkConfig,
    credentials: NetworkCredentials,
    *,
    previous: NetworkConfig | None = None,
    skip: set[str] = frozenset(),
    retries: int = 4,
    backoff: float = 0.5,
    progress: Callable[[str, str, str], None] | None = None,
) -> SyncReport:
    """Switch every node of the network to ``config``: prepare on all, then commit on all.

    Raises ``SyncError`` (nothing committed anywhere) when a node refuses phase 1, or when a
    node that cannot be reached would serve a span it did not serve before (the chain would
    be incomplete without it). Otherwise the admin's own copy is written last and the report
    lists who committed and who is ``pending`` (away; pulls on return). The nodes in ``skip``
    are known lost: not asked at all (no retries to wait for), pending at once.
    ``progress(node_id, op, outcome)`` is told each node's outcome per phase."""
    data_dir = Path(data_dir)
    me = credentials.identity.node_id
    config = sign_config(config, admin_ca(data_dir, config.network_id))
    previous = previous if previous is not None else held_config(data_dir, config.network_id)
    report = SyncReport(config.version)
    missing = await asyncio.to_thread(missing_blocks, data_dir, config, me)
    if missing:
        report.refused[me] = f"missing blocks {', '.join(missing)}"
        raise SyncError("missing_blocks", f"this node lacks {', '.join(missing)}", report)
    for node_id in sorted(skip & {n.node_id for n in config.nodes}):
        report.pending[node_id] = "lost: not asked"
    others = [n for n in config.nodes if n.node_id != me and n.node_id not in skip]
    body = {"network_id": config.network_id, "config": config.model_dump(mode="json")}
    outcomes = await _on_all(others, credentials, "config_prepare", body, report, retries, backoff)
    prepared = []
    for node, outcome in zip(others, outcomes, strict=True):
        if outcome is None:
            prepared.append(node)
        elif isinstance(outcome, ControlError) or _needed(node, previous):
            report.refused[node.node_id] = str(outcome)
        else:
            report.pending[node.node_id] = str(outcome)
        if progress:
            progress(node.node_id, "prepare", "ok" if outcome is None else str(outcome))
    if report.refused:
        abort = {"network_id": config.network_id, "version": config.version}
        await _on_all(prepared, credentials, "config_abort", abort, report, 0, backoff)
        who = "; ".join(f"{node}: {why}" for node, why in report.refused.items())
        raise SyncError(
            "prepare_refused", f"config v{config.version} not switched to: {who}", report
        )
    commit = {"network_id": config.network_id, "version": config.version}
    outcomes = await _on_all(
        prepared, credentials, "config_commit", commit, report, retries, backoff
    )
    for node, outcome in zip(prepared, outcomes, strict=True):
        if outcome is None:
            report.committed.append(node.node_id)
        else:  # prepared but gone (or restarted) before the commit: it pulls on return
            report.pending[node.node_id] = str(outcome)
        if progress:
            progress(node.node_id, "commit", "ok" if outcome is None else str(outcome))
    if is_newer(held_config(data_dir, config.network_id), config):  # not over a newer one
        write_config(data_dir, config)
    if report.pending:
        log.warning(
            "network %s: config v%d pending on %s (they pull it when they return)",
            config.network_id,
            config.version,
            ", ".join(report.pending),
        )
    return report


def _needed(node: NodeEntry, previous: NetworkConfig | None) -> bool:
    """Whether the new chain needs ``node`` to have switched: it serves a span it did not
    (a backup is not in the chain: the switch goes on without it)."""
    if not node.blocks or node.role == "backup":
        return False
    if previous is None:
        return True
    try:
        return previous.node(node.node_id).blocks != node.blocks
    except ConfigError:
        return True


async def _on_all(nodes, credentials, op, body, report, retries, backoff) -> list:
    return await asyncio.gather(
        *(_call(n, credentials, op, body, report, retries, backoff) for n in nodes)
    )


async def _call(
    node: NodeEntry,
    credentials: NetworkCredentials,
    op: str,
    body: dict,
    report: SyncReport,
    retries: int,
    backoff: float,
) -> Exception | None:
    """One acknowledged call, retried with backoff while the node cannot be reached or its
    reply is lost; a refusal is an answer and is not retried. None when acknowledged."""
    if node.control_address is None:
        return PeerUnavailable(f"node {node.node_id} has no control port in the config")
    counts = report.attempts.setdefault(op, {})
    delay, last = backoff, None
    for attempt in range(retries + 1):
        counts[node.node_id] = counts.get(node.node_id, 0) + 1
        try:
            async with ControlLink.to(node, credentials) as link:
                await link.call(op, **body)
            return None
        except ControlError as exc:
            return exc
        except UNREACHABLE as exc:
            last = exc
            log.info("%s to %s failed (attempt %d): %s", op, node.node_id, attempt + 1, exc)
        if attempt < retries:
            await asyncio.sleep(delay)
            delay *= 2
    return last
