"""The joining node's side of ``join_network``: by token at once, or by the admin's approval."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tiktrue.control.network_admin import poke_local_service
from tiktrue.control.network_manager import (
    JoinError,
    JoinGrant,
    install_block_key,
    install_grant,
    make_join_request,
    parse_token,
)
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.node.resources import free_ports
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.auth_manager import IdentityError
from tiktrue.security.node_tls import NetworkCredentials


async def join_network(
    data_dir: Path,
    admin_address: str,
    *,
    service: dict,
    token: str | None = None,
    network_id: str | None = None,
    admin_node_id: str | None = None,
    block_port: int | None = None,
    wait: float = 600.0,
    poll: float = 1.0,
    log=print,
) -> NetworkConfig:
    """``service`` is this node's run file (where its control channel listens)."""
    secret = None
    if token:
        network_id, admin_node_id, secret = parse_token(token)
    if not network_id:
        raise JoinError("name the network to join (--network) or give a join token")
    host, control_port = service["control"].rsplit(":", 1)
    request = make_join_request(
        data_dir,
        network_id,
        host=host,
        block_port=block_port or free_ports(1, host)[0],
        control_port=int(control_port),
        token_secret=secret,
    )
    async with ControlLink(admin_address, expected_node_id=admin_node_id) as link:
        if admin_node_id is None:
            log(f"the admin at {admin_address} is node {link.node_id}: check it on the admin PC")
        reply = await link.call("join", request=request.model_dump())
        deadline = time.monotonic() + wait
        while reply["state"] == "pending":
            if time.monotonic() > deadline:
                raise JoinError(f"no approval within {wait:.0f} s (request {reply['request_id']})")
            if reply.get("request_id") and not reply.get("told"):
                log(
                    f"waiting for approval; on the admin PC: tiktrue network approve "
                    f"{network_id} {reply['request_id']}"
                )
            request_id = reply["request_id"]
            await asyncio.sleep(poll)
            reply = await link.call(
                "join_status", request=request.model_dump(), request_id=request_id
            )
            reply.setdefault("request_id", request_id)
            reply["told"] = True
        if reply["state"] != "approved":
            raise JoinError(f"the admin {reply['state']} the join request")
    config = install_grant(data_dir, JoinGrant.model_validate(reply["grant"]))
    await fetch_block_key(data_dir, network_id, admin_address, admin_node_id)
    await poke_local_service(data_dir)
    return config


async def fetch_block_key(
    data_dir: Path, network_id: str, admin_address: str, admin_node_id: str | None
) -> None:
    """The network's block key, asked of the admin with this node's new certificate (mutual
    TLS and the challenge), kept owner-only beside the certificate."""
    credentials = NetworkCredentials.load(data_dir, network_id)
    try:
        async with ControlLink(
            admin_address, expected_node_id=admin_node_id, credentials=credentials
        ) as link:
            reply = await link.call("block_key", network_id=network_id)
    except (PeerUnavailable, ControlError, IdentityError, OSError) as exc:
        raise JoinError(
            f"joined {network_id}, but its block key could not be fetched from the admin at "
            f"{admin_address}: {exc}; run the join again"
        ) from exc
    install_block_key(data_dir, network_id, bytes.fromhex(reply["block_key"]))
