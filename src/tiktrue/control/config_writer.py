"""One writer per network config: the running admin service's queue, which alone numbers
versions.

Every change to a network's config (a plan applied from the CLI or the dashboard, a failover,
a join by token or by approval, a leave, a removal, a re-plan, a node's new control port) is a
``ConfigChange``: a function of the config it finds. The writer runs the changes of one
network one at a time, in the order they came: it reads the config on disk, applies the
change, gives the result the next version number, signs it and switches every node to it
(``config_sync``'s two-phase broadcast), and only then takes the next change. So two changes
can never make the same version, and none is lost.

Slow work happens before a change reaches the queue: a plan is measured, and the blocks it
moves are pushed, outside it. Such a change says which version it was planned against
(``planned_against``): if another change committed meanwhile (a failover while the admin's
plan pushed its blocks), it is refused with ``ConfigChanged`` and the caller plans again
(``plans.apply_network`` does), never written over the newer config.

Inside the node service the writer is ``NodeService.writer``. This PC's own ``tiktrue``
commands reach it over the service's control channel as its owner (``ServiceWriter``:
``writer_for``); where no service runs from the data dir, they write directly, with a
``ConfigWriter`` of their own, and say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import psutil

from tiktrue.control.config_signing import sign_config
from tiktrue.control.config_sync import broadcast_config_updates
from tiktrue.control.local_service import owner_link
from tiktrue.control.network_manager import admin_ca
from tiktrue.node.control_link import ControlError
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    config_path,
    read_config,
    write_config,
)
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.config_writer")


class ConfigChange(Protocol):
    """A change to a network's config, as a function of the config it finds: ``apply``
    returns the new content (its version is the writer's to set), or None when there is
    nothing to change. It may raise to refuse (nothing is written then)."""

    def apply(self, current: NetworkConfig) -> NetworkConfig | None: ...

    def describe(self) -> str: ...


class ConfigChanged(ConfigError):
    """A change planned against one version found a newer one: plan it again."""

    code = "config_changed"

    def __init__(self, network_id: str, planned_against: int, current: int) -> None:
        super().__init__(
            f"network {network_id} moved to config v{current} while this change was planned "
            f"against v{planned_against}: it was not applied over the newer config; plan again"
        )
        self.network_id = network_id
        self.planned_against = planned_against
        self.current = current
        self.info = {"planned_against": planned_against, "current": current}


class ConfigWriter:
    """The one writer of the configs of the networks this data dir administers.

    ``on_written(network_id)`` runs after each new version is in place (the node service
    reloads its servers); ``direct``: this is a command's own writer, used because no node
    service runs from the data dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        on_written: Callable[[str], Awaitable[None]] | None = None,
        direct: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.on_written = on_written
        self.direct = direct
        self._queues: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # FIFO per network

    async def commit(
        self,
        network_id: str,
        change: ConfigChange,
        *,
        planned_against: int | None = None,
        skip: set[str] = frozenset(),
        publish: bool = True,
    ) -> NetworkConfig | None:
        """Apply ``change`` to the current config as the next version. ``publish``: switch
        every node to it now (two-phase; the ``skip`` nodes are lost: not asked, they pull
        it when they return), else only this node writes it (others get it with the next
        broadcast, or pull it). Returns the config now in force, or None when the change
        had nothing to do. Raises ``ConfigChanged`` when ``planned_against`` is not the
        current version; ``SyncError`` when a node refused the switch (nothing committed:
        the version number is free again)."""
        async with self._queues[network_id]:
            current = read_config(config_path(self.data_dir, network_id))
            if planned_against is not None and current.version != planned_against:
                raise ConfigChanged(network_id, planned_against, current.version)
            content = change.apply(current)
            if content is None:
                return None
            # a change may know the network is ahead of this copy (a restored admin's nodes
            # hold newer versions): the next version passes theirs too
            after = max(current.version, getattr(change, "after_version", 0))
            new = NetworkConfig.model_validate(
                {**content.model_dump(), "version": after + 1, "signature": None}
            )
            if publish:
                credentials = NetworkCredentials.load(self.data_dir, network_id)
                await broadcast_config_updates(
                    self.data_dir, new, credentials, previous=current, skip=skip
                )
            else:
                write_config(self.data_dir, sign_config(new, admin_ca(self.data_dir, network_id)))
            log.info("network %s: config v%d: %s", network_id, new.version, change.describe())
            if self.on_written is not None:
                await self.on_written(network_id)
            return read_config(config_path(self.data_dir, network_id))

    async def republish(self, network_id: str, *, skip: set[str] = frozenset()) -> None:
        """Send the current config to every node again (after changes written with
        ``publish=False``), in the queue: never beside a change of the same network."""
        async with self._queues[network_id]:
            current = read_config(config_path(self.data_dir, network_id))
            credentials = NetworkCredentials.load(self.data_dir, network_id)
            report = await broadcast_config_updates(
                self.data_dir, current, credentials, previous=current, skip=skip
            )
            log.info(
                "network %s: config v%d committed on %s, pending on %s",
                network_id,
                current.version,
                report.committed,
                list(report.pending),
            )


class ServiceWriter:
    """The writer of the node service running from this data dir, reached over its control
    channel as its owner: the changes of this PC's commands join the service's queue."""

    direct = False

    def __init__(self, data_dir: Path, address: str) -> None:
        self.data_dir = Path(data_dir)
        self.address = address

    async def call(self, op: str, **fields: Any) -> dict:
        async with owner_link(self.data_dir, self.address) as link:
            return await link.call(op, **fields)

    async def commit(
        self,
        network_id: str,
        change: Any,
        *,
        planned_against: int | None = None,
        skip: set[str] = frozenset(),
        publish: bool = True,
    ) -> NetworkConfig | None:
        """As ``ConfigWriter.commit``; ``change`` must be one of the changes the control
        channel takes from its owner (``OwnerChange``)."""
        try:
            reply = await self.call(
                "config_change",
                network_id=network_id,
                change=change.model_dump(mode="json"),
                planned_against=planned_against,
                skip=sorted(skip),
                publish=publish,
            )
        except ControlError as exc:
            if exc.code == ConfigChanged.code:
                current = exc.info.get("current")
                raise ConfigChanged(network_id, planned_against or 0, current) from exc
            raise
        config = reply.get("config")
        return None if config is None else NetworkConfig.model_validate(config)


Writer = ConfigWriter | ServiceWriter


def service_address(data_dir: Path) -> str | None:
    """The control address of the node service running from ``data_dir``; None when none
    runs (no run file, or its process is gone: a crash leaves the file behind)."""
    path = run_file(data_dir)
    if not path.is_file():
        return None
    info = json.loads(path.read_text("utf-8"))
    pid = info.get("pid")
    if not info.get("control") or not isinstance(pid, int) or not psutil.pid_exists(pid):
        return None
    if pid == os.getpid():
        raise RuntimeError("inside the node service: use its own writer (NodeService.writer)")
    return info["control"]


def writer_for(data_dir: Path) -> Writer:
    """The writer for a command on this PC: the running node service's (over its control
    channel), or, when no service runs from ``data_dir``, a direct one (``.direct``)."""
    address = service_address(data_dir)
    if address is None:
        return ConfigWriter(data_dir, direct=True)
    return ServiceWriter(data_dir, address)
