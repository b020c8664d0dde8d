"""Joining a network, both sides: the admin's (one-time tokens, join requests waiting for
approval, grants) and the joining PC's (``join_network``: by token at once, or by the admin's
approval; then the network's block key over mutual TLS).

A join request comes from a PC that holds no certificate yet, so anyone on the LAN can send
one: its fields are size-limited, and pending requests are capped per source address and in
total (``tiktrue.limits``), and forgotten after ``TOKEN_TTL``. The grant carries the config
signed by the network's CA, which the joiner checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from tiktrue import limits
from tiktrue.control.config_signing import verify_config
from tiktrue.control.config_writer import ConfigWriter, ServiceWriter, Writer, writer_for
from tiktrue.control.local_service import poke_local_service
from tiktrue.control.network_manager import (
    admin_ca,
    install_block_key,
    name_of_this_pc,
    node_cert_hosts,
)
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.node.resources import free_ports
from tiktrue.paths import write_text_atomic
from tiktrue.protocol.network_config import (
    NetworkConfig,
    NodeEntry,
    config_path,
    network_dir,
    read_config,
    write_config,
)
from tiktrue.protocol.protocol_spec import ID_PATTERN
from tiktrue.security.auth_manager import (
    IdentityError,
    NetworkCA,
    sign_challenge,
    verify_key_possession,
)
from tiktrue.security.node_tls import NetworkCredentials, install_certificate, node_identity

TOKEN_TTL = 24 * 3600
WAITING = ("pending", "approving")  # a request's states before the admin's answer is in


class JoinError(Exception):
    """A join that cannot go ahead (bad token, unknown request, not the admin, ...)."""

    code = "join_refused"


class TooManyJoinRequests(JoinError):
    """Too many join requests wait for approval (from this address, or in all)."""

    code = "too_many_requests"


# --- the admin's side ---------------------------------------------------------------------


def create_join_token(data_dir: Path, network_id: str, ttl: float = TOKEN_TTL) -> str:
    """A one-time token ``<network_id>.<admin node id>.<secret>``; only its hash is kept."""
    admin_ca(data_dir, network_id)
    secret = secrets.token_urlsafe(24)
    tokens = _load(_tokens_path(data_dir, network_id), [])
    now = time.time()
    tokens = [t for t in tokens if t["expires"] > now and not t.get("used_by")]
    tokens.append({"sha256": _digest(secret), "expires": now + ttl, "used_by": None})
    _save(_tokens_path(data_dir, network_id), tokens)
    return f"{network_id}.{node_identity(data_dir).node_id}.{secret}"


def parse_token(token: str) -> tuple[str, str, str]:
    parts = token.strip().split(".")
    if len(parts) < 3 or not all(parts):
        raise JoinError("a join token looks like <network>.<admin node>.<secret>")
    return parts[0], parts[1], ".".join(parts[2:])


class JoinRequest(BaseModel):
    """What a joining PC sends (before it holds any certificate: every field is bounded)."""

    network_id: str = Field(pattern=ID_PATTERN)
    public_key_pem: str = Field(max_length=400)  # a P-256 public key in PEM is ~180 chars
    proof: str = Field(max_length=160)  # hex signature over the join challenge: holds the key
    name: str = Field("", max_length=limits.MAX_NODE_NAME_CHARS)
    host: str = Field("127.0.0.1", min_length=1, max_length=limits.MAX_HOST_CHARS)
    block_port: int = Field(ge=1, le=65535)
    control_port: int | None = Field(None, ge=1, le=65535)
    token_secret: str | None = Field(None, max_length=128)  # None: wait for the admin's approval


class JoinGrant(BaseModel):
    """What the admin hands a joiner over the join handshake (TLS that authenticates only the
    admin). The network's block key is not in it: the joiner fetches it with its new
    certificate, over mutual TLS (``fetch_block_key``)."""

    network_id: str
    ca_cert: str
    node_cert: str
    config: dict


def join_challenge(public_key_pem: str, network_id: str) -> tuple[bytes, bytes]:
    """(nonce, context) the joiner signs: binds the request to its key and the network."""
    nonce = hashlib.sha256(public_key_pem.encode()).digest()
    return nonce, f"tiktrue-join:{network_id}".encode()


async def accept_join(
    data_dir: Path, writer: ConfigWriter, request: JoinRequest, *, source: str = ""
) -> JoinGrant | str:
    """Admin: a token join gives a grant at once (the node enters the config through the
    network's ``writer``); without a token the request waits for approval and its id is
    returned. ``source``: the address it came from, for the caps on pending requests (raises
    ``TooManyJoinRequests`` over them)."""
    ca = admin_ca(data_dir, request.network_id)
    node_id = _check_proof(request)
    _refuse_revoked(data_dir, request.network_id, node_id)
    if request.token_secret is None:
        path = _requests_path(data_dir, request.network_id)
        requests = _forget_stale(_load(path, {}))
        for request_id, item in requests.items():
            if item["node_id"] == node_id and item["state"] in WAITING:
                return request_id
        pending = [item for item in requests.values() if item["state"] in WAITING]
        per_source = limits.MAX_PENDING_JOINS_PER_SOURCE
        if sum(item.get("source") == source for item in pending) >= per_source:
            raise TooManyJoinRequests(
                f"{per_source} join requests from {source or 'this address'} wait for "
                "approval already; ask the admin to approve or reject them"
            )
        if len(pending) >= limits.MAX_PENDING_JOINS:
            raise TooManyJoinRequests(
                f"{limits.MAX_PENDING_JOINS} join requests wait for approval already; ask the admin"
            )
        request_id = uuid.uuid4().hex[:12]
        requests[request_id] = {
            "node_id": node_id,
            "state": "pending",
            "request": request.model_dump(),
            "asked_at": time.time(),
            "source": source,
        }
        _save(path, requests)
        return request_id
    _spend_token(data_dir, request.network_id, request.token_secret, node_id)
    return await _grant(writer, ca, request, node_id)


def _forget_stale(requests: dict[str, dict]) -> dict[str, dict]:
    """Pending requests older than a token's lifetime are dropped (their PC gave up)."""
    oldest = time.time() - TOKEN_TTL
    return {
        request_id: item
        for request_id, item in requests.items()
        if item["state"] not in WAITING or item.get("asked_at", 0) >= oldest
    }


def _refuse_revoked(data_dir: Path, network_id: str, node_id: str) -> None:
    config = read_config(config_path(data_dir, network_id))
    if node_id in config.revoked_ids:
        raise JoinError(_revoked_message(node_id, network_id))


def _revoked_message(node_id: str, network_id: str) -> str:
    return (
        f"node {node_id} was removed from network {network_id}; a PC that should come back "
        "needs a new identity (delete its <data>/identity folder)"
    )


def list_join_requests(data_dir: Path, network_id: str) -> dict[str, dict]:
    return _load(_requests_path(data_dir, network_id), {})


async def decide_join_request(
    data_dir: Path, writer: ConfigWriter, network_id: str, request_id: str, approve: bool = True
) -> str:
    """Approve (the node enters the config through the network's ``writer``) or reject a join
    request; the joining PC gets its grant on its next poll. Returns the request's state. In
    the process of the network's writer only: ``decide`` routes a command there."""
    ca = admin_ca(data_dir, network_id)
    path = _requests_path(data_dir, network_id)
    requests = _load(path, {})
    item = requests.get(request_id)
    if item is None:
        raise JoinError(f"no join request {request_id} in network {network_id}")
    if item["state"] != "pending":
        raise JoinError(f"join request {request_id} is already {item['state']}")
    if not approve:
        item["state"] = "rejected"
        _save(path, requests)
        return "rejected"
    item["state"] = "approving"  # a second approval meanwhile is refused
    _save(path, requests)
    request = JoinRequest.model_validate(item["request"])
    try:
        grant = await _grant(writer, ca, request, item["node_id"])
    except BaseException:
        _set_request(path, request_id, state="pending")
        raise
    _set_request(path, request_id, state="approved", grant=grant.model_dump())
    return "approved"


def _set_request(path: Path, request_id: str, **fields) -> None:
    """Update one request in the file as it is now (others may have come meanwhile)."""
    requests = _load(path, {})
    requests[request_id].update(fields)
    _save(path, requests)


async def decide(
    data_dir: Path,
    network_id: str,
    request_id: str,
    approve: bool = True,
    *,
    writer: Writer | None = None,
) -> str:
    """``tiktrue network approve [--reject]`` and the dashboard: in the node service running
    from ``data_dir`` when one runs (its writer), else here."""
    writer = writer or writer_for(data_dir)
    if isinstance(writer, ServiceWriter):
        reply = await writer.call(
            "join_decide", network_id=network_id, request_id=request_id, approve=approve
        )
        return reply["state"]
    return await decide_join_request(data_dir, writer, network_id, request_id, approve)


async def new_token(
    data_dir: Path, network_id: str, ttl: float = TOKEN_TTL, *, writer: Writer | None = None
) -> str:
    """``tiktrue network token``: a one-time join token, made by the node service running
    from ``data_dir`` when one runs (it spends them: one process writes the tokens file)."""
    writer = writer or writer_for(data_dir)
    if isinstance(writer, ServiceWriter):
        reply = await writer.call("join_token", network_id=network_id, ttl=ttl)
        return reply["token"]
    return create_join_token(data_dir, network_id, ttl)


def join_status(
    data_dir: Path, request: JoinRequest, request_id: str
) -> tuple[str, JoinGrant | None]:
    """The state of a join request; only its author (who proves the same key) may ask, since
    an approved grant carries the node's certificate (the block key comes after, over mutual
    TLS)."""
    network_id = request.network_id
    item = _load(_requests_path(data_dir, network_id), {}).get(request_id)
    if item is None:
        raise JoinError(f"no join request {request_id} in network {network_id}")
    if _check_proof(request) != item["node_id"]:
        raise JoinError(f"join request {request_id} belongs to another node")
    grant = JoinGrant.model_validate(item["grant"]) if item.get("grant") else None
    return "pending" if item["state"] in WAITING else item["state"], grant


def _check_proof(request: JoinRequest) -> str:
    nonce, context = join_challenge(request.public_key_pem, request.network_id)
    try:
        signature = bytes.fromhex(request.proof)
        return verify_key_possession(request.public_key_pem.encode(), nonce, signature, context)
    except (ValueError, IdentityError) as exc:
        raise JoinError(f"the join request does not prove its key: {exc}") from exc


def _spend_token(data_dir: Path, network_id: str, secret: str, node_id: str) -> None:
    path = _tokens_path(data_dir, network_id)
    tokens = _load(path, [])
    digest, now = _digest(secret), time.time()
    for token in tokens:
        if secrets.compare_digest(token["sha256"], digest):
            if token.get("used_by"):
                raise JoinError("this join token was already used; ask the admin for a new one")
            if token["expires"] < now:
                raise JoinError("this join token has expired; ask the admin for a new one")
            token["used_by"] = node_id
            _save(path, tokens)
            return
    raise JoinError("unknown join token")


@dataclass(frozen=True)
class AddMember:
    """A joining node enters the config (a worker with no blocks yet; a plan gives it some)."""

    entry: NodeEntry

    def apply(self, current: NetworkConfig) -> NetworkConfig:
        if self.entry.node_id in current.revoked_ids:
            raise JoinError(_revoked_message(self.entry.node_id, current.network_id))
        nodes = [n for n in current.nodes if n.node_id != self.entry.node_id]
        return current.model_copy(update={"nodes": [*nodes, self.entry]})

    def describe(self) -> str:
        return f"node {self.entry.node_id} joined"


async def _grant(
    writer: ConfigWriter, ca: NetworkCA, request: JoinRequest, node_id: str
) -> JoinGrant:
    entry = NodeEntry(
        node_id=node_id,
        role="worker",
        host=request.host,
        port=request.block_port,
        control_port=request.control_port,
        name=request.name,
    )
    # written here only: a node with no blocks is nobody's neighbour; the next plan (a
    # re-plan after the join) sends it to every node
    config = await writer.commit(request.network_id, AddMember(entry), publish=False)
    cert = ca.generate_node_certificate(
        node_id, request.public_key_pem.encode(), "worker", hosts=node_cert_hosts(request.host)
    )
    return JoinGrant(
        network_id=request.network_id,
        ca_cert=ca.cert_pem.decode(),
        node_cert=cert.decode(),
        config=config.model_dump(),
    )


# --- the joining node's side ----------------------------------------------------------------


def make_join_request(
    data_dir: Path,
    network_id: str,
    *,
    host: str,
    block_port: int,
    control_port: int | None,
    token_secret: str | None,
) -> JoinRequest:
    identity = node_identity(data_dir)
    public_pem = identity.public_key_pem().decode()
    nonce, context = join_challenge(public_pem, network_id)
    return JoinRequest(
        network_id=network_id,
        public_key_pem=public_pem,
        proof=sign_challenge(identity, nonce, context).hex(),
        name=name_of_this_pc(),
        host=host,
        block_port=block_port,
        control_port=control_port,
        token_secret=token_secret,
    )


def install_grant(data_dir: Path, grant: JoinGrant) -> NetworkConfig:
    """The joiner keeps its certificate, the CA and the config (which the network's CA must
    have signed)."""
    config = verify_config(NetworkConfig.model_validate(grant.config), grant.ca_cert.encode())
    install_certificate(
        data_dir, grant.network_id, grant.ca_cert.encode(), grant.node_cert.encode()
    )
    write_config(data_dir, config)
    return config


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


# --- small file helpers -------------------------------------------------------------------


def _tokens_path(data_dir: Path, network_id: str) -> Path:
    return network_dir(data_dir, network_id) / "join_tokens.json"


def _requests_path(data_dir: Path, network_id: str) -> Path:
    return network_dir(data_dir, network_id) / "join_requests.json"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _load(path: Path, default):
    if not path.is_file():
        return default
    return json.loads(path.read_text("utf-8"))


def _save(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
