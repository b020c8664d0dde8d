"""``network_config_<network_id>.json``: who is in a network and which blocks each node serves.

Every node of a network keeps the same config in its data dir; the node service starts one
block server per config in which it appears. The network's CA certificate and this node's
certificate for the network live beside it in ``<data>/networks/<network_id>/``.

The admin signs each config it hands out with the network's CA key (``signature``, over
``canonical_bytes``: everything but the signature), and a node takes a config from elsewhere
only when that signature verifies (``control.config_signing``). ``revoked`` lists the nodes
the admin removed: every node refuses their certificates at once.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from tiktrue.limits import DEFAULT_CONTEXT_TOKENS, ContextTokens
from tiktrue.paths import write_text_atomic
from tiktrue.protocol.protocol_spec import ID_PATTERN

CONFIG_PREFIX = "network_config_"


class ConfigError(Exception):
    """A network config that is missing, malformed, or does not fit its model."""


class NodeEntry(BaseModel):
    node_id: str = Field(pattern=ID_PATTERN)
    role: Literal["admin", "worker", "backup"] = "worker"
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)  # this node's block server for the network
    control_port: int | None = Field(None, ge=1, le=65535)  # its control channel
    name: str = ""
    blocks: list[str] = Field(default_factory=list)  # a contiguous span of model_chain_order

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def control_address(self) -> str | None:
        return f"{self.host}:{self.control_port}" if self.control_port else None


class Revoked(BaseModel):
    """A node the admin removed: its certificates are refused on every node of the network."""

    node_id: str = Field(pattern=ID_PATTERN)
    at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(), max_length=64)
    reason: str = Field("", max_length=200)


class NetworkConfig(BaseModel):
    network_id: str = Field(pattern=ID_PATTERN)
    name: str = ""
    model_id: str
    model_chain_order: list[str]
    port: int = Field(7480, ge=1, le=65535, description="default block-server port of the network")
    nodes: list[NodeEntry]
    version: int = Field(1, ge=1)
    auto_plan: bool = True  # re-plan and re-distribute when a node joins or leaves
    backup_nodes: int = Field(0, ge=0, le=16)  # backups the planner holds back, if it can
    # the KV cache the plan reserved on every node for one conversation: the network's context
    # length, when the model's own is not shorter
    context_tokens: ContextTokens = DEFAULT_CONTEXT_TOKENS
    # the planner chose it (as much as the nodes' memory allows, up to the model's own; each
    # re-plan chooses again), not the admin (``network plan --context N`` keeps N)
    context_auto: bool = True
    heartbeat_s: float = Field(0.25, gt=0, le=60)  # the admin beats every node this often
    dead_after_s: float = Field(4.0, gt=0, le=600)  # no good beat this long: the node is dead
    webhook_url: str | None = Field(None, description="health alerts are POSTed here as JSON")
    # workers keep the blocks pushed to them sealed with the network's AES-256-GCM key
    encrypt_at_rest: bool = False
    updated_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    revoked: list[Revoked] = Field(default_factory=list)
    signature: str | None = Field(None, description="the network CA's, hex; see canonical_bytes")

    @model_validator(mode="after")
    def _beats_fit(self) -> NetworkConfig:
        if self.dead_after_s <= self.heartbeat_s:
            raise ValueError(
                f"dead_after_s ({self.dead_after_s}) must be longer than heartbeat_s "
                f"({self.heartbeat_s}): a node would be dead between two beats"
            )
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http(s) URL, not {self.webhook_url!r}")
        return self

    @model_validator(mode="after")
    def _no_revoked_member(self) -> NetworkConfig:
        back = self.revoked_ids & {n.node_id for n in self.nodes}
        if back:
            raise ValueError(f"revoked nodes cannot be members: {', '.join(sorted(back))}")
        return self

    @model_validator(mode="after")
    def _chain_is_covered(self) -> NetworkConfig:
        serving = [n for n in self.nodes if n.blocks and n.role != "backup"]
        at = 0
        for node in sorted(serving, key=lambda n: self._index(n.blocks[0])):
            first = self._index(node.blocks[0])
            if first != at or node.blocks != self.model_chain_order[at : at + len(node.blocks)]:
                raise ValueError(
                    f"node {node.node_id} serves {node.blocks[0]}..{node.blocks[-1]}, "
                    f"but the chain needs {self.model_chain_order[at]} next, in order"
                )
            at += len(node.blocks)
        if serving and at != len(self.model_chain_order):
            raise ValueError(f"no node serves {self.model_chain_order[at]}..")
        return self

    def canonical_bytes(self) -> bytes:
        """What the signature covers: the canonical JSON of everything but the signature,
        the same on every node for the same content (also the basis of conflict digests)."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @property
    def revoked_ids(self) -> frozenset[str]:
        return frozenset(r.node_id for r in self.revoked)

    @property
    def node_ids(self) -> frozenset[str]:
        return frozenset(n.node_id for n in self.nodes)

    def _index(self, block: str) -> int:
        try:
            return self.model_chain_order.index(block)
        except ValueError:
            raise ValueError(f"block {block!r} is not in model_chain_order") from None

    def context_length(self, model_config: Any) -> int:
        """The network's context length in tokens: the KV cache its plan reserved on every
        node, or the model's own context (``max_position_embeddings`` of its config) when that
        is shorter. The gateway refuses a prompt that does not fit; each node reserves it."""
        model = getattr(model_config, "max_position_embeddings", None)
        return min(self.context_tokens, model) if isinstance(model, int) else self.context_tokens

    def node(self, node_id: str) -> NodeEntry:
        for entry in self.nodes:
            if entry.node_id == node_id:
                return entry
        raise ConfigError(f"node {node_id} is not in network {self.network_id}")

    def chain(self) -> list[NodeEntry]:
        """The serving nodes in chain order: embed first, head last."""
        serving = [n for n in self.nodes if n.blocks and n.role != "backup"]
        return sorted(serving, key=lambda n: self._index(n.blocks[0]))

    def backups(self) -> list[NodeEntry]:
        """Nodes holding a replica of a span, ready to take over (not in the chain)."""
        return [n for n in self.nodes if n.role == "backup" and n.blocks]

    def replica_of(self, backup: NodeEntry) -> list[NodeEntry] | None:
        """The consecutive chain nodes whose spans ``backup``'s replica is, exactly (the run
        it can take over, or serve beside them), or None: a replica of something else, or of
        a run that includes the admin (whose loss is never failed over)."""
        replica = set(backup.blocks)
        covered = [n for n in self.chain() if set(n.blocks) <= replica]
        if not covered or [b for n in covered for b in n.blocks] != backup.blocks:
            return None
        if any(n.role == "admin" for n in covered):
            return None
        return covered

    def replica_chains(self) -> list[tuple[str, ...]]:
        """Second chains for new conversations (seed 001's replicas): the chain with the run
        an idle backup replicates served by that backup instead, as node ids, for each backup
        whose replica leaves the chain's first node (the gateway's entry) in place."""
        chain = self.chain()
        routes = []
        for backup in self.backups():
            covered = self.replica_of(backup)
            if not covered or covered[0].node_id == chain[0].node_id:
                continue
            at = chain.index(covered[0])
            route = [n.node_id for n in chain[:at]] + [backup.node_id]
            routes.append(tuple(route + [n.node_id for n in chain[at + len(covered) :]]))
        return routes

    def next_node(self, node_id: str) -> NodeEntry | None:
        """The node after ``node_id`` in the chain; None for the head and for a backup."""
        if self.node(node_id).role == "backup":
            return None
        chain = self.chain()
        for i, entry in enumerate(chain):
            if entry.node_id == node_id:
                return chain[i + 1] if i + 1 < len(chain) else None
        raise ConfigError(f"node {node_id} serves no blocks in network {self.network_id}")


def config_path(data_dir: Path, network_id: str) -> Path:
    return Path(data_dir) / f"{CONFIG_PREFIX}{network_id}.json"


def network_dir(data_dir: Path, network_id: str) -> Path:
    """Where a network's CA certificate and this node's certificate live."""
    path = Path(data_dir) / "networks" / network_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(data_dir: Path, config: NetworkConfig) -> Path:
    path = config_path(data_dir, config.network_id)
    write_text_atomic(path, json.dumps(config.model_dump(), indent=2))
    return path


def read_config(path: Path) -> NetworkConfig:
    try:
        return NetworkConfig.model_validate_json(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a valid network config: {exc}") from exc


def list_configs(data_dir: Path) -> list[NetworkConfig]:
    """Every network config in the data dir (sorted by network id)."""
    return [read_config(p) for p in sorted(Path(data_dir).glob(f"{CONFIG_PREFIX}*.json"))]
