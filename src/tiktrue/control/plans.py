"""Plan and apply: measure the nodes, place the spans, push each node the blocks of its new
span, switch the network to the new config.

The one implementation behind ``tiktrue network plan|apply|remove``, the dashboard's plan
preview and Apply, the re-plan after a join, a leave, and failover's redistribution and
return. Blocks are pushed before the new config is committed and outside the network's one
writer (``config_writer``); the commit names the version the plan was made against, and when
the network moved on meanwhile (a failover while blocks were pushed) the plan is made again on
the new config, never written over it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from tiktrue.control.config_writer import ConfigChanged, Writer, writer_for
from tiktrue.control.distributor import PushProgress, push_blocks
from tiktrue.control.network_admin import load, network_status, set_caps
from tiktrue.control.planner import ModelProfile, NodeCapacity, Plan, plan_with_backups
from tiktrue.model.store import BlockStore
from tiktrue.node.resources import ram_cap
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    NodeEntry,
    Revoked,
    config_path,
    read_config,
)

REPLANS = 3  # plans made for one apply, when the network keeps changing under it


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


class NewPlan(BaseModel):
    """A plan as a change of the network's config: each node's span (a backup's replica),
    without the nodes in ``remove``, with ``revoke`` added to the revocation list."""

    kind: Literal["plan"] = "plan"
    assignments: dict[str, list[str]]
    backups: dict[str, list[str]] = Field(default_factory=dict)
    context_tokens: int
    context_auto: bool = True
    remove: list[str] = Field(default_factory=list)
    revoke: list[Revoked] = Field(default_factory=list)

    @classmethod
    def of(cls, plan: Plan, *, remove=(), revoke=()) -> NewPlan:
        return cls(
            assignments=plan.assignments,
            backups=plan.backups,
            context_tokens=plan.context_tokens,
            context_auto=plan.context_auto,
            remove=sorted(remove),
            revoke=list(revoke),
        )

    def apply(self, current: NetworkConfig) -> NetworkConfig:
        holds = {**self.assignments, **self.backups}
        nodes = [
            n.model_copy(update={"blocks": list(holds.get(n.node_id, [])), "role": self._role(n)})
            for n in current.nodes
            if n.node_id not in self.remove
        ]
        return NetworkConfig.model_validate(
            {
                **current.model_dump(),
                "nodes": [n.model_dump() for n in nodes],
                "context_tokens": self.context_tokens,
                "context_auto": self.context_auto,
                "revoked": [*current.revoked, *self.revoke],
            }
        )

    def _role(self, node: NodeEntry) -> str:
        """The admin stays admin; a node holding a replica is a backup, one in the chain a
        worker."""
        if node.role == "admin":
            return "admin"
        if node.node_id in self.backups:
            return "backup"
        return "worker" if node.node_id in self.assignments else node.role

    def describe(self) -> str:
        gone = f", without {', '.join(self.remove)}" if self.remove else ""
        return f"a new plan over {len(self.assignments)} nodes{gone}"


class RemoveNode(BaseModel):
    """A node that holds no blocks leaves the network (on the revocation list with
    ``revoke``)."""

    kind: Literal["remove"] = "remove"
    node_id: str
    revoke: Revoked | None = None

    def apply(self, current: NetworkConfig) -> NetworkConfig | None:
        if self.node_id not in current.node_ids:
            return None  # gone already (a retry whose answer was lost)
        return NetworkConfig.model_validate(
            {
                **current.model_dump(),
                "nodes": [n.model_dump() for n in current.nodes if n.node_id != self.node_id],
                "revoked": [*current.revoked, *([self.revoke] if self.revoke else [])],
            }
        )

    def describe(self) -> str:
        return f"node {self.node_id} removed" + (" and revoked" if self.revoke else "")


# the changes this PC's commands may send the node service's writer (``config_change``)
OwnerChange = Annotated[NewPlan | RemoveNode, Field(discriminator="kind")]


async def apply_plan(
    data_dir: Path,
    network_id: str,
    plan: Plan,
    *,
    planned_against: int,
    writer: Writer | None = None,
    progress: Callable[[PushProgress], None] | None = None,
    remove: set[str] = frozenset(),
    lost: set[str] = frozenset(),
    revoke: list[Revoked] = (),
) -> NetworkConfig:
    """Push every node the blocks of its new span (and each backup its replica), then commit
    the new config through the network's writer (every node switches to it): without the
    nodes in ``remove``, which are leaving (and on the revocation list, the ``revoke``
    ones); the ``lost`` ones stay members (they pull the config when they return) but are
    not asked now. Raises ``ConfigChanged`` when the network is no longer at
    ``planned_against`` (before pushing anything when it can tell)."""
    writer = writer or writer_for(data_dir)
    config, credentials = load(data_dir, network_id)
    if config.version != planned_against:
        raise ConfigChanged(network_id, planned_against, config.version)
    store = BlockStore(Path(data_dir) / "models" / config.model_id)
    by_id = {n.node_id: n for n in config.nodes}
    me = credentials.identity.node_id
    for node_id, blocks in {**plan.assignments, **plan.backups}.items():
        if node_id != me:
            await push_blocks(
                data_dir, network_id, store, by_id[node_id], blocks, progress=progress
            )
    change = NewPlan.of(plan, remove=remove, revoke=revoke)
    return await writer.commit(network_id, change, planned_against=planned_against, skip=set(lost))


async def apply_network(
    data_dir: Path,
    network_id: str,
    *,
    writer: Writer | None = None,
    caps: dict[str, dict] | None = None,
    measured: dict | None = None,
    overrides: dict[str, int] | None = None,
    context_tokens: int | None = None,
    remove: set[str] = frozenset(),
    lost: set[str] = frozenset(),
    revoke: list[Revoked] = (),
    progress: Callable[[PushProgress], None] | None = None,
    step: Callable[..., None] | None = None,
    planned: Callable[[Plan], None] | None = None,
) -> NetworkConfig:
    """Measure, plan, push, switch: ``tiktrue network apply``, the dashboard's Apply (which
    first sets the ``caps`` that changed; ``measured``: a status that says the caps now),
    the re-plan after a join, a removal (``remove``, ``revoke``), and failover (without the
    ``lost`` nodes). Nodes the admin's monitor holds dead are not asked either.

    When the network moves on while this runs (another change committed first), the plan is
    made again on the new config, up to ``REPLANS`` times; ``step(template, **values)`` hears
    what it does and why (an English template and its values: the UI shows it translated),
    ``planned`` each plan before its blocks move, ``progress`` every chunk pushed.
    ``writer``: the network's writer (default: the running node service's, or a direct one
    when none runs: ``writer_for``)."""
    writer = writer or writer_for(data_dir)
    step = step or (lambda text, **params: None)
    current = {n["node_id"]: n.get("caps") or {} for n in (measured or {}).get("nodes", [])}
    for node_id, wanted in (caps or {}).items():
        wanted = {**current.get(node_id, {}), **wanted}
        if wanted != current.get(node_id):
            step("setting the caps of node {node}", node=node_id)
            await set_caps(data_dir, network_id, node_id, wanted)
    for attempt in range(REPLANS):
        step("measuring the nodes")
        plan, status = await make_plan(
            data_dir,
            network_id,
            overrides=overrides,
            context_tokens=context_tokens,
            without=set(lost) | set(remove),
        )
        if planned is not None:
            planned(plan)
        step("sending each node its blocks")
        dead = {n["node_id"] for n in status["nodes"] if n.get("health") == "dead"}
        try:
            return await apply_plan(
                data_dir,
                network_id,
                plan,
                planned_against=status["version"],
                writer=writer,
                progress=progress,
                remove=remove,
                lost=set(lost) | dead,
                revoke=revoke,
            )
        except ConfigChanged as exc:
            if attempt + 1 == REPLANS:
                raise
            step(
                "the network moved to config v{current} while this plan (made against "
                "v{planned}) pushed its blocks: planning again",
                current=exc.current,
                planned=exc.planned_against,
            )
    raise AssertionError("unreachable")


async def remove_node(
    data_dir: Path,
    network_id: str,
    node_id: str,
    *,
    revoke: bool,
    reason: str = "",
    writer: Writer | None = None,
) -> NetworkConfig:
    """The admin drops ``node_id`` from the network: when it holds blocks the network is
    planned again without it first (its span moves to the others), else a config without it
    is committed. With ``revoke`` (``tiktrue network remove``) its certificates go on the
    revocation list of that signed config: every node refuses them as soon as it commits the
    config, on open connections too. Without it (a node leaving by itself) it may join
    again."""
    writer = writer or writer_for(data_dir)
    revoked = [Revoked(node_id=node_id, reason=reason[:200])] if revoke else []
    for attempt in range(REPLANS):
        config = read_config(config_path(data_dir, network_id))
        leaving = config.node(node_id)
        if leaving.role == "admin":
            raise ConfigError(f"node {node_id} is the admin of {network_id}; it cannot be removed")
        if leaving.blocks:
            return await apply_network(
                data_dir, network_id, writer=writer, remove={node_id}, revoke=revoked
            )
        change = RemoveNode(node_id=node_id, revoke=revoked[0] if revoked else None)
        try:
            done = await writer.commit(network_id, change, planned_against=config.version)
        except ConfigChanged:
            if attempt + 1 == REPLANS:
                raise
            continue  # another change came first (it may have given the node blocks): again
        return done or read_config(config_path(data_dir, network_id))
    raise AssertionError("unreachable")
