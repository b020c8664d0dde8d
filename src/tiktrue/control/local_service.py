"""The node service running from this data dir, as this PC's own programs reach it.

``tiktrue`` commands and scripts on a PC talk to the node service of the same data dir over
its control channel as its **owner** (they can read the node's identity key; trust never
comes from an address). Where it listens is in its run file (``<data>/run/node.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.paths import run_file
from tiktrue.security.auth_manager import IdentityError
from tiktrue.security.node_tls import node_identity


def local_control_address(data_dir: Path) -> str | None:
    """Where the node service running from this data dir listens (its run file)."""
    path = run_file(data_dir)
    if not path.is_file():
        return None
    return json.loads(path.read_text("utf-8")).get("control")


def owner_link(data_dir: Path, address: str) -> ControlLink:
    """A link to the node service at ``address`` as its owner, pinned to this node's id."""
    identity = node_identity(data_dir)
    return ControlLink(address, expected_node_id=identity.node_id, owner=identity)


async def poke_local_service(data_dir: Path) -> bool:
    """Ask the node service running from this data dir to re-read its configs (as its owner:
    this process can read the node's key)."""
    control = local_control_address(data_dir)
    if not control:
        return False
    try:
        async with owner_link(data_dir, control) as link:
            await link.call("reload")
    except (PeerUnavailable, ControlError, IdentityError, OSError):
        return False
    return True
