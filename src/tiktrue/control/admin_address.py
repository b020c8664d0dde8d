"""An admin that starts at another address (restored on another PC from a backup, or given a
new LAN address) tells its network where it is now.

At start, the admin compares its address with the one its network's config records for it.
When its host moved, it asks the other nodes which config version each holds (``node_info``
over the control channel, as a member: a node may hold a newer version than a restored
backup); the network's writer makes the next version, above all of them, with its own entry
at the new host and control port, signed by the network's CA (``AdminMoved``). The service
then gives itself a certificate for the new address (``cert_renewal``) and broadcasts the
config: the nodes take it (signed by their CA, newer, sent by the admin's certificate) and
follow the admin to its new address
without joining again. A node away meanwhile finds the admin on the LAN when it returns
(``config_sync.find_admin``) and pulls the config there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from tiktrue.node.control_link import ControlLink
from tiktrue.protocol.network_config import NetworkConfig, config_path, read_config
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.config_sync")
ASK_TIMEOUT_S = 5.0  # per node: one that does not answer is left to pull on its return


async def _held_version(node, credentials: NetworkCredentials, network_id: str) -> int:
    async with ControlLink.to(node, credentials) as link:
        info = await link.call("node_info")
    return int(info["networks"][network_id]["version"])


async def highest_version(config: NetworkConfig, credentials: NetworkCredentials) -> int:
    """The highest config version the network's other nodes hold (the config's own when none
    answers within ``ASK_TIMEOUT_S``)."""
    me = credentials.identity.node_id
    others = [n for n in config.nodes if n.node_id != me and n.control_port]
    asked = await asyncio.gather(
        *(
            asyncio.wait_for(_held_version(n, credentials, config.network_id), ASK_TIMEOUT_S)
            for n in others
        ),
        return_exceptions=True,
    )
    held = [v for v in asked if isinstance(v, int)]
    for node, answer in zip(others, asked, strict=True):
        if not isinstance(answer, int):
            log.info("network %s: node %s not asked (%s)", config.network_id, node.node_id, answer)
    return max([config.version, *held])


@dataclass(frozen=True)
class AdminMoved:
    """The admin listens at ``host``:``control_port`` now: a change for the network's writer.
    ``after_version``: the highest version the nodes hold (a restored backup may be behind
    them), which the writer's next version must pass."""

    node_id: str
    host: str
    control_port: int
    after_version: int

    def apply(self, current: NetworkConfig) -> NetworkConfig | None:
        entry = current.node(self.node_id)
        if (entry.host, entry.control_port) == (self.host, self.control_port):
            return None
        nodes = [
            n.model_copy(update={"host": self.host, "control_port": self.control_port})
            if n.node_id == self.node_id
            else n
            for n in current.nodes
        ]
        return current.model_copy(update={"nodes": nodes})

    def describe(self) -> str:
        return f"the admin {self.node_id} listens at {self.host}:{self.control_port} now"


async def admin_move(
    data_dir: Path, network_id: str, node_id: str, host: str, control_port: int
) -> AdminMoved | None:
    """The change that records the admin's new address, or None when it is where the config
    says (see the module)."""
    config = read_config(config_path(data_dir, network_id))
    entry = config.node(node_id)
    if entry.host == host and entry.control_port == control_port:
        return None
    after = config.version
    if entry.host != host:  # another PC (a restore) or a new lease: nodes may be ahead
        after = await highest_version(config, NetworkCredentials.load(data_dir, network_id))
        log.warning(
            "network %s: this admin moved from %s to %s; telling the nodes (config v%d)",
            network_id,
            entry.host,
            host,
            after + 1,
        )
    return AdminMoved(node_id, host, control_port, after)
