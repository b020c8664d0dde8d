"""``network_manager``: create a network, hand out join tokens, accept joins, join, leave.

State lives in files, so the CLI and the node service share it without talking to each other:
``<data>/network_config_<id>.json`` and ``<data>/networks/<id>/`` holding the CA certificate,
this node's certificate, the network's block key, and on the admin the CA key (``ca/``),
join tokens (only their hashes) and join requests waiting for approval.

A join request comes from a PC that holds no certificate yet, so anyone on the LAN can send
one: its fields are size-limited, and pending requests are capped per source address and in
total (``tiktrue.limits``), and forgotten after ``TOKEN_TTL``. The
grant carries the config signed by the network's CA, which the joiner checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, Field

from tiktrue import limits
from tiktrue.control.config_signing import sign_config, verify_config
from tiktrue.model.store import BlockStore
from tiktrue.paths import write_text_atomic
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    NodeEntry,
    config_path,
    list_configs,
    network_dir,
    read_config,
    write_config,
)
from tiktrue.protocol.protocol_spec import ID_PATTERN
from tiktrue.security.auth_manager import (
    IdentityError,
    NetworkCA,
    create_network_ca,
    sign_challenge,
    verify_key_possession,
)
from tiktrue.security.crypto_layer import new_block_key
from tiktrue.security.node_tls import (
    BLOCK_KEY,
    install_certificate,
    load_block_key,
    node_identity,
)

TOKEN_TTL = 24 * 3600


class JoinError(Exception):
    """A join that cannot go ahead (bad token, unknown request, not the admin, ...)."""

    code = "join_refused"


class TooManyJoinRequests(JoinError):
    """Too many join requests wait for approval (from this address, or in all)."""

    code = "too_many_requests"


# --- the admin's side ---------------------------------------------------------------------


def create_network(
    data_dir: Path,
    name: str,
    store: BlockStore,
    *,
    host: str = "127.0.0.1",
    port: int = 7480,
    control_port: int | None = None,
    network_id: str | None = None,
    auto_plan: bool = True,
    backup_nodes: int = 0,
    encrypt_at_rest: bool = False,
) -> NetworkConfig:
    """Make a network administered by this node; at first this node serves every block.
    ``encrypt_at_rest``: workers keep the blocks pushed to them sealed with the network key."""
    data_dir = Path(data_dir)
    network_id = network_id or f"net-{uuid.uuid4().hex[:8]}"
    if config_path(data_dir, network_id).exists():
        raise ConfigError(f"network {network_id} already exists")
    identity = node_identity(data_dir)
    folder = network_dir(data_dir, network_id)
    ca = create_network_ca(network_id, folder / "ca")
    cert = ca.generate_node_certificate(
        identity.node_id, identity.public_key, "admin", hosts=node_cert_hosts(host)
    )
    install_certificate(data_dir, network_id, ca.cert_pem, cert)
    install_block_key(data_dir, network_id, new_block_key())
    config = NetworkConfig(
        network_id=network_id,
        name=name,
        model_id=store.model_id,
        model_chain_order=store.manifest.model_chain_order,
        port=port,
        auto_plan=auto_plan,
        backup_nodes=backup_nodes,
        encrypt_at_rest=encrypt_at_rest,
        nodes=[
            NodeEntry(
                node_id=identity.node_id,
                role="admin",
                host=host,
                port=port,
                control_port=control_port,
                name=name_of_this_pc(),
                blocks=list(store.manifest.model_chain_order),
            )
        ],
    )
    config = sign_config(config, ca)
    write_config(data_dir, config)
    return config


def name_of_this_pc() -> str:
    import platform

    return platform.node() or "this PC"


def node_cert_hosts(host: str) -> tuple[str, ...]:
    """What a node certificate names: the node's address, and this PC's loopback names (its
    own programs reach its gateway there)."""
    return tuple(dict.fromkeys([host, "127.0.0.1", "localhost"]))


def _write_secret(path: Path, text: str) -> None:
    path.write_text(text, "utf-8")
    with contextlib.suppress(OSError):  # Windows: the user profile is private already
        path.chmod(0o600)


def install_block_key(data_dir: Path, network_id: str, key: bytes) -> None:
    """The network's AES-256-GCM block key, readable by this user only."""
    _write_secret(network_dir(data_dir, network_id) / BLOCK_KEY, key.hex())


def block_key(data_dir: Path, network_id: str) -> bytes:
    key = load_block_key(data_dir, network_id)
    if key is None:
        raise JoinError(f"this node holds no block key for network {network_id}")
    return key


def admin_ca(data_dir: Path, network_id: str) -> NetworkCA:
    folder = Path(data_dir) / "networks" / network_id / "ca"
    if not (folder / "ca_key.pem").is_file():
        raise JoinError(f"this node is not the admin of network {network_id}")
    return NetworkCA.load(folder)


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


def accept_join(data_dir: Path, request: JoinRequest, *, source: str = "") -> JoinGrant | str:
    """Admin: a token join gives a grant at once; without a token the request waits for
    approval and its id is returned. ``source``: the address it came from, for the caps on
    pending requests (raises ``TooManyJoinRequests`` over them)."""
    ca = admin_ca(data_dir, request.network_id)
    node_id = _check_proof(request)
    _refuse_revoked(data_dir, request.network_id, node_id)
    if request.token_secret is None:
        path = _requests_path(data_dir, request.network_id)
        requests = _forget_stale(_load(path, {}))
        for request_id, item in requests.items():
            if item["node_id"] == node_id and item["state"] == "pending":
                return request_id
        pending = [item for item in requests.values() if item["state"] == "pending"]
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
    return _grant(data_dir, ca, request, node_id)


def _forget_stale(requests: dict[str, dict]) -> dict[str, dict]:
    """Pending requests older than a token's lifetime are dropped (their PC gave up)."""
    oldest = time.time() - TOKEN_TTL
    return {
        request_id: item
        for request_id, item in requests.items()
        if item["state"] != "pending" or item.get("asked_at", 0) >= oldest
    }


def _refuse_revoked(data_dir: Path, network_id: str, node_id: str) -> None:
    config = read_config(config_path(data_dir, network_id))
    if node_id in config.revoked_ids:
        raise JoinError(
            f"node {node_id} was removed from network {network_id}; a PC that should come "
            "back needs a new identity (delete its <data>/identity folder)"
        )


def list_join_requests(data_dir: Path, network_id: str) -> dict[str, dict]:
    return _load(_requests_path(data_dir, network_id), {})


def approve_join_request(data_dir: Path, network_id: str, request_id: str, approve: bool = True):
    ca = admin_ca(data_dir, network_id)
    requests = _load(_requests_path(data_dir, network_id), {})
    item = requests.get(request_id)
    if item is None:
        raise JoinError(f"no join request {request_id} in network {network_id}")
    if item["state"] != "pending":
        raise JoinError(f"join request {request_id} is already {item['state']}")
    if approve:
        request = JoinRequest.model_validate(item["request"])
        item["grant"] = _grant(data_dir, ca, request, item["node_id"]).model_dump()
    item["state"] = "approved" if approve else "rejected"
    _save(_requests_path(data_dir, network_id), requests)


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
    return item["state"], grant


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


def _grant(data_dir: Path, ca: NetworkCA, request: JoinRequest, node_id: str) -> JoinGrant:
    _refuse_revoked(data_dir, request.network_id, node_id)
    cert = ca.generate_node_certificate(
        node_id, request.public_key_pem.encode(), "worker", hosts=node_cert_hosts(request.host)
    )
    config = read_config(config_path(data_dir, request.network_id))
    nodes = [n for n in config.nodes if n.node_id != node_id]
    nodes.append(
        NodeEntry(
            node_id=node_id,
            role="worker",
            host=request.host,
            port=request.block_port,
            control_port=request.control_port,
            name=request.name,
        )
    )
    config = config.model_copy(update={"nodes": nodes, "version": config.version + 1})
    config = sign_config(NetworkConfig.model_validate(config.model_dump()), ca)
    write_config(data_dir, config)
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


async def join_network(data_dir: Path, admin_address: str, **options) -> NetworkConfig:
    """Seed name kept: the joining side lives in ``tiktrue.control.join``."""
    from tiktrue.control.join import join_network as join

    return await join(data_dir, admin_address, **options)


def discover_networks(timeout: float = 3.0, **options):
    """Seed name kept: discovery lives in ``tiktrue.control.discovery`` (zeroconf)."""
    from tiktrue.control.discovery import discover_networks as discover

    return discover(timeout, **options)


def list_joined_networks(data_dir: Path) -> list[NetworkConfig]:
    """The networks this node belongs to."""
    node_id = node_identity(data_dir).node_id
    return [c for c in list_configs(data_dir) if node_id in {n.node_id for n in c.nodes}]


def leave_network(data_dir: Path, network_id: str) -> None:
    """Forget a network here (its certificate, key and config); the admin drops the node."""
    import shutil

    config_path(data_dir, network_id).unlink(missing_ok=True)
    shutil.rmtree(Path(data_dir) / "networks" / network_id, ignore_errors=True)


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
