"""The planner: which contiguous span of ``model_chain_order`` each node of a network serves.

Every token passes through every serving node in chain order, so the time per token is the sum
of each node's compute for its span plus the link latency of every hop after the first. A CPU
decode step is bound by the weight bytes it reads, so a block's compute cost is its bytes
(``embed`` is a table lookup and costs ~0), and a node's speed is the weight bytes it processes
per millisecond per token, measured by a short probe.

A span fits a node when its weights, its KV budget (``context_tokens`` tokens of every layer in
the span) and the node process's baseline memory fit the node's RAM cap, and its weights fit the
node's disk cap. Unless the admin chooses the context, :func:`plan_with_backups` reserves the
longest the nodes' memory allows, up to the model's own (see :func:`plan_auto_context`).
:func:`plan_spans` finds, by dynamic programming over (node, blocks covered),
the split with the smallest estimated time per token (ties toward balance: the lower slowest
node), and refuses, saying what is missing in human units, when nothing fits.

Pure Python: no I/O, no torch. Byte sizes are shown in decimal units (1 GB = 10**9 bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiktrue.limits import (
    DEFAULT_CONTEXT_TOKENS,
    KV_PAGE_TOKENS,
    MIN_AUTO_CONTEXT_TOKENS,
    kv_bytes_per_token_per_layer,
)
from tiktrue.model.catalog import EMBED

# a serving node process without weights: Python, torch, servers, model code (bench/network.py)
DEFAULT_RUNTIME_BYTES = 400_000_000
DTYPE_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
_REL_EPS = 1e-9  # float sums that differ by less than this (relative) are ties


class PlanError(Exception):
    """No plan fits (or a manual override is invalid); the message says what is missing."""


def human_bytes(n: float) -> str:
    """``1234567890`` -> ``"1.2 GB"``, ``113_000_000`` -> ``"113 MB"`` (decimal units)."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1000:
        return f"{sign}{int(value)} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.5 or unit == "PB":
            text = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable")


def is_layer(block: str) -> bool:
    return block.startswith("layer_")


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


@dataclass(frozen=True)
class ModelProfile:
    """What the planner needs to know about a model: block sizes and KV size."""

    model_id: str
    chain_order: list[str]
    block_bytes: dict[str, int]  # weights per block
    kv_bytes_per_token_per_layer: int  # keys + values of one token in one layer
    max_context: int | None = None  # the model's own context (max_position_embeddings)

    def __post_init__(self) -> None:
        if not self.chain_order:
            raise PlanError(f"model {self.model_id} has an empty chain")
        if len(set(self.chain_order)) != len(self.chain_order):
            raise PlanError(f"model {self.model_id} repeats a block in its chain")
        missing = [b for b in self.chain_order if b not in self.block_bytes]
        if missing:
            raise PlanError(f"model {self.model_id}: no size for block(s) {', '.join(missing)}")
        if any(self.block_bytes[b] < 0 for b in self.chain_order):
            raise PlanError(f"model {self.model_id}: a block has a negative size")
        if self.kv_bytes_per_token_per_layer < 0:
            raise PlanError(f"model {self.model_id}: negative KV size")

    @classmethod
    def from_manifest(cls, manifest: Any, config: Any) -> ModelProfile:
        """From a block store's ``Manifest`` and the model's ``transformers`` config (or dict).

        KV bytes per token per layer = 2 (k and v) * num_key_value_heads * head_dim * itemsize.
        """
        heads = _get(config, "num_attention_heads")
        kv_heads = _get(config, "num_key_value_heads") or heads
        head_dim = _get(config, "head_dim") or (_get(config, "hidden_size") // heads)
        try:
            itemsize = DTYPE_ITEMSIZE[manifest.dtype]
        except KeyError:
            raise PlanError(
                f"unknown dtype {manifest.dtype!r} (use one of {', '.join(DTYPE_ITEMSIZE)})"
            ) from None
        order = list(manifest.model_chain_order)
        own = _get(config, "max_position_embeddings")
        return cls(
            model_id=manifest.model_id,
            chain_order=order,
            block_bytes={name: int(manifest.blocks[name].bytes) for name in order},
            kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(
                int(kv_heads), int(head_dim), itemsize
            ),
            max_context=own if isinstance(own, int) and own > 0 else None,
        )

    @property
    def num_layers(self) -> int:
        return sum(1 for b in self.chain_order if is_layer(b))

    @property
    def total_bytes(self) -> int:
        return sum(self.block_bytes[b] for b in self.chain_order)

    def compute_bytes(self, block: str) -> int:
        """Weight bytes read per token: a block's bytes, except ``embed`` (one row looked up)."""
        return 0 if block == EMBED else self.block_bytes[block]

    def kv_bytes(self, blocks: Sequence[str], context_tokens: int) -> int:
        """The KV budget of a span: ``context_tokens`` tokens of every layer in it."""
        layers = sum(1 for b in blocks if is_layer(b))
        return self.kv_bytes_per_token_per_layer * layers * context_tokens


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers, after the admin's caps, and how fast it is."""

    node_id: str
    ram_bytes: int  # cap for weights + KV + the node process
    disk_bytes: int  # cap for stored blocks
    bytes_per_ms: float  # weight bytes processed per millisecond per token (probe)
    link_ms: float = 0.0  # one-way latency from the previous hop (0 for the first)
    runtime_bytes: int = DEFAULT_RUNTIME_BYTES

    def __post_init__(self) -> None:
        if not self.bytes_per_ms > 0:
            raise PlanError(f"node {self.node_id}: speed must be positive, not {self.bytes_per_ms}")
        if self.link_ms < 0:
            raise PlanError(f"node {self.node_id}: negative link latency")

    @property
    def free_ram(self) -> int:
        """RAM left for weights and KV once the node process runs."""
        return max(0, self.ram_bytes - self.runtime_bytes)


@dataclass
class NodePlan:
    """One serving node's part of a plan, for display."""

    node_id: str
    blocks: list[str]
    weight_bytes: int
    kv_bytes: int
    ram_needed: int  # weights + KV + runtime
    compute_ms: float
    link_ms: float  # counted in the estimate (0 for the first node of the chain)

    @property
    def span(self) -> str:
        return _span_name(self.blocks)


@dataclass
class Plan:
    """Which blocks each serving node holds, in chain order, and the estimated time per token."""

    model_id: str
    assignments: dict[str, list[str]]  # only serving nodes, in chain order
    est_ms_per_token: float
    nodes: list[NodePlan] = field(default_factory=list)  # same order as ``assignments``
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    context_auto: bool = False  # the planner chose the context (the admin did not)
    # backup node -> the replica it holds: a run of consecutive spans it can take over at once
    backups: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why a wanted backup was not placed

    @property
    def max_node_ms(self) -> float:
        return max((n.compute_ms for n in self.nodes), default=0.0)

    def spans(self) -> dict[str, tuple[str, str]]:
        """``node_id -> (first block, last block)``."""
        return {node: (blocks[0], blocks[-1]) for node, blocks in self.assignments.items()}

    def describe(self) -> str:
        count = len(self.assignments)
        how = " (as much as the nodes' memory allows)" if self.context_auto else ""
        lines = [
            f"{self.model_id} on {count} node{'s' if count != 1 else ''}: "
            f"~{self.est_ms_per_token:.1f} ms per token, KV for {self.context_tokens} tokens{how}"
        ]
        for n in self.nodes:
            link = f", link {n.link_ms:.1f} ms" if n.link_ms else ""
            lines.append(
                f"  {n.node_id}: {n.span} ({len(n.blocks)} blocks) weights "
                f"{human_bytes(n.weight_bytes)} + KV {human_bytes(n.kv_bytes)} -> RAM "
                f"{human_bytes(n.ram_needed)}, compute {n.compute_ms:.1f} ms{link}"
            )
        for node, blocks in self.backups.items():
            lines.append(f"  {node}: backup of {_span_name(blocks)} ({len(blocks)} blocks)")
        lines += [f"  no backup: {why}" for why in self.notes]
        return "\n".join(lines)


class _Prefix:
    """Prefix sums over the chain so that any span's sizes cost O(1)."""

    def __init__(self, model: ModelProfile, context_tokens: int) -> None:
        self.model = model
        self.context_tokens = context_tokens
        self.weights, self.compute, self.layers = [0], [0], [0]
        for b in model.chain_order:
            self.weights.append(self.weights[-1] + model.block_bytes[b])
            self.compute.append(self.compute[-1] + model.compute_bytes(b))
            self.layers.append(self.layers[-1] + (1 if is_layer(b) else 0))

    def weight(self, i: int, j: int) -> int:
        return self.weights[j] - self.weights[i]

    def kv(self, i: int, j: int) -> int:
        per_layer = self.model.kv_bytes_per_token_per_layer * self.context_tokens
        return per_layer * (self.layers[j] - self.layers[i])

    def ram(self, node: NodeCapacity, i: int, j: int) -> int:
        return self.weight(i, j) + self.kv(i, j) + node.runtime_bytes

    def fits(self, node: NodeCapacity, i: int, j: int) -> bool:
        return self.ram(node, i, j) <= node.ram_bytes and self.weight(i, j) <= node.disk_bytes

    def compute_ms(self, node: NodeCapacity, i: int, j: int) -> float:
        return (self.compute[j] - self.compute[i]) / node.bytes_per_ms


def _better(a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Is cost ``a`` (total ms, slowest node ms) better than ``b``? Near-equal totals tie."""
    if b is None:
        return True
    eps = _REL_EPS * max(1.0, abs(a[0]), abs(b[0]))
    if a[0] < b[0] - eps:
        return True
    if a[0] > b[0] + eps:
        return False
    return a[1] < b[1] - _REL_EPS * max(1.0, abs(a[1]), abs(b[1]))


def _node_plan(
    pre: _Prefix, node_id: str, i: int, j: int, node: NodeCapacity | None, first: bool
) -> NodePlan:
    runtime = node.runtime_bytes if node else DEFAULT_RUNTIME_BYTES
    weight, kv = pre.weight(i, j), pre.kv(i, j)
    return NodePlan(
        node_id=node_id,
        blocks=list(pre.model.chain_order[i:j]),
        weight_bytes=weight,
        kv_bytes=kv,
        ram_needed=weight + kv + runtime,
        compute_ms=pre.compute_ms(node, i, j) if node else 0.0,
        link_ms=0.0 if first or node is None else node.link_ms,
    )


def _make_plan(
    pre: _Prefix, parts: list[tuple[str, int, int, NodeCapacity | None]], context_tokens: int
) -> Plan:
    nodes = [
        _node_plan(pre, node_id, i, j, node, first=k == 0)
        for k, (node_id, i, j, node) in enumerate(parts)
    ]
    return Plan(
        model_id=pre.model.model_id,
        assignments={n.node_id: n.blocks for n in nodes},
        est_ms_per_token=sum(n.compute_ms + n.link_ms for n in nodes),
        nodes=nodes,
        context_tokens=context_tokens,
    )


def even_plan(
    model: ModelProfile,
    nodes: Sequence[str | NodeCapacity],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """Nearly equal numbers of blocks per node, in order (for tests and demos); no fit check.

    ``nodes`` are node ids, or :class:`NodeCapacity` to also estimate the time per token.
    """
    count, total = len(nodes), len(model.chain_order)
    if not 1 <= count <= total:
        raise PlanError(f"cannot split {total} blocks evenly over {count} nodes")
    pre = _Prefix(model, context_tokens)
    size, extra = divmod(total, count)
    parts, at = [], 0
    for k, item in enumerate(nodes):
        n = size + (1 if k < extra else 0)
        capacity = item if isinstance(item, NodeCapacity) else None
        node_id = item.node_id if isinstance(item, NodeCapacity) else item
        parts.append((node_id, at, at + n, capacity))
        at += n
    return _make_plan(pre, parts, context_tokens)


def plan_spans(
    model: ModelProfile,
    nodes: list[NodeCapacity],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    overrides: dict[str, int] | None = None,
) -> Plan:
    """The fastest split of the chain into contiguous spans over ``nodes``, in their order.

    A node may get no blocks (it is then not in the chain). ``overrides`` fixes the number of
    blocks of named nodes; the others are planned around them. Raises :class:`PlanError`, saying
    what is missing, when no split fits.
    """
    if not nodes:
        raise PlanError("no nodes to place the model on")
    ids = [n.node_id for n in nodes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise PlanError(f"node(s) listed twice: {', '.join(duplicates)}")
    if context_tokens < 0:
        raise PlanError(f"context_tokens must not be negative, not {context_tokens}")
    total = len(model.chain_order)
    overrides = dict(overrides or {})
    _check_overrides(overrides, ids, total)

    pre = _Prefix(model, context_tokens)
    count = len(nodes)
    # best[i][b]: cost of covering blocks [0, b) with nodes [0, i); take[i][b]: node i-1's share
    best: list[list[tuple[float, float] | None]] = [[None] * (total + 1) for _ in range(count + 1)]
    take: list[list[int]] = [[0] * (total + 1) for _ in range(count + 1)]
    best[0][0] = (0.0, 0.0)
    for i, node in enumerate(nodes):
        fixed = overrides.get(node.node_id)
        # from the end down: on a tie, the earlier nodes keep the blocks (k = 0 comes first)
        for b in range(total, -1, -1):
            cost = best[i][b]
            if cost is None:
                continue
            shares = range(total - b + 1) if fixed is None else (fixed,)
            for k in shares:
                if b + k > total:
                    break
                if k == 0:
                    candidate = cost
                else:
                    if not pre.fits(node, b, b + k):
                        if fixed is None:
                            break  # longer spans need more RAM and disk still
                        continue
                    ms = pre.compute_ms(node, b, b + k)
                    link = node.link_ms if b > 0 else 0.0
                    candidate = (cost[0] + ms + link, max(cost[1], ms))
                if _better(candidate, best[i + 1][b + k]):
                    best[i + 1][b + k] = candidate
                    take[i + 1][b + k] = k

    if best[count][total] is None:
        reached = max((b for b in range(total + 1) if best[count][b] is not None), default=0)
        raise PlanError(_explain(pre, nodes, overrides, reached))

    parts: list[tuple[str, int, int, NodeCapacity | None]] = []
    b = total
    for i in range(count, 0, -1):
        k = take[i][b]
        if k:
            parts.append((nodes[i - 1].node_id, b - k, b, nodes[i - 1]))
        b -= k
    parts.reverse()
    return _make_plan(pre, parts, context_tokens)


def _check_overrides(overrides: dict[str, int], ids: list[str], total: int) -> None:
    unknown = [name for name in overrides if name not in ids]
    if unknown:
        raise PlanError(
            f"override names unknown node(s) {', '.join(unknown)} (the nodes are {', '.join(ids)})"
        )
    negative = [f"{name}={k}" for name, k in overrides.items() if k < 0]
    if negative:
        raise PlanError(f"override counts must not be negative: {', '.join(negative)}")
    fixed = sum(overrides.values())
    if fixed > total:
        raise PlanError(f"the overrides give {fixed} blocks, but the chain has only {total} blocks")
    if len(overrides) == len(ids) and fixed != total:
        raise PlanError(
            f"the overrides give {fixed} blocks to all the nodes, but the chain has {total} blocks"
        )


def _explain(
    pre: _Prefix, nodes: list[NodeCapacity], overrides: dict[str, int], reached: int
) -> str:
    """Why no split fits, in human units: the first of the checks below that fails."""
    model, tokens = pre.model, pre.context_tokens
    weights, kv = pre.weight(0, len(model.chain_order)), pre.kv(0, len(model.chain_order))
    usable = [n for n in nodes if overrides.get(n.node_id) != 0]
    free = sum(n.free_ram for n in usable)
    if weights + kv > free:
        return (
            f"the model needs {human_bytes(weights + kv - free)} more RAM: "
            f"{human_bytes(weights + kv)} of weights and KV for {tokens} tokens, "
            f"the nodes give {human_bytes(free)} (after the runtime of each node)"
        )
    disk = sum(n.disk_bytes for n in usable)
    if weights > disk:
        return (
            f"the model needs {human_bytes(weights - disk)} more disk: "
            f"{human_bytes(weights)} of weights, the nodes give {human_bytes(disk)}"
        )
    for b, name in enumerate(model.chain_order):
        if not any(pre.fits(n, b, b + 1) for n in usable):
            size = model.block_bytes[name]
            block_kv = pre.kv(b, b + 1)
            with_kv = f" + {human_bytes(block_kv)} KV" if block_kv else ""
            if all(size + block_kv > n.free_ram for n in usable):
                largest = max(n.free_ram for n in usable)
                return (
                    f"block {name} ({human_bytes(size)}{with_kv}) fits on no node: "
                    f"the largest free RAM is {human_bytes(largest)}"
                )
            largest = max(n.disk_bytes for n in usable)
            return (
                f"block {name} ({human_bytes(size)}) fits on no node: "
                f"the largest disk is {human_bytes(largest)}"
            )
    total = len(model.chain_order)
    for n in nodes:
        k = overrides.get(n.node_id)
        if k and not any(pre.fits(n, b, b + k) for b in range(total - k + 1)):
            b = min(range(total - k + 1), key=lambda s: pre.ram(n, s, s + k))
            return (
                f"node {n.node_id} cannot hold the {k} blocks of its override: the lightest "
                f"{k} consecutive blocks ({_span_name(model.chain_order[b : b + k])}) "
                f"need {human_bytes(pre.ram(n, b, b + k))} of RAM with KV for {tokens} tokens "
                f"and its runtime, and {human_bytes(pre.weight(b, b + k))} of disk; the node "
                f"gives {human_bytes(n.ram_bytes)} of RAM and {human_bytes(n.disk_bytes)} of disk"
            )
    rest = pre.weight(reached, total) + pre.kv(reached, total)
    with_overrides = " with these overrides" if overrides else ""
    if not reached:
        return f"no contiguous split fits{with_overrides}: no node can start the chain"
    held, left = _span_name(model.chain_order[:reached]), _span_name(model.chain_order[reached:])
    return (
        f"no contiguous split fits{with_overrides}: in chain order the nodes can hold at most "
        f"{held}, and {left} ({human_bytes(rest)} with KV) does not fit on the nodes after them"
    )


def _span_name(blocks: Sequence[str]) -> str:
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]}..{blocks[-1]}"


def plan_with_backups(
    model: ModelProfile,
    nodes: list[NodeCapacity],
    backups: int,
    *,
    keep_first: str | None = None,
    context_tokens: int | None = None,
    overrides: dict[str, int] | None = None,
) -> Plan:
    """The chain plan, with up to ``backups`` nodes held back as backups (``Plan.backups``).
    ``context_tokens``: the KV cache every node reserves; None: the longest the nodes allow
    (:func:`plan_auto_context`).

    Nodes with the most RAM are tried first as backups (a backup must hold a replica of a
    long run of spans); a node is held back only when the chain still fits without it. Each
    backup replicates the longest run of consecutive spans it can hold, never the span of
    ``keep_first`` (the admin: its loss is not failed over). Without room for a backup the
    chain plan is made anyway and ``Plan.notes`` says why.
    """
    if context_tokens is None:
        return plan_auto_context(model, nodes, backups, keep_first=keep_first, overrides=overrides)
    held: list[NodeCapacity] = []
    missing: list[str] = []
    chain_nodes = list(nodes)
    for _ in range(backups):
        candidates = sorted(
            (
                n
                for n in chain_nodes
                if n.node_id != keep_first and n.node_id not in (overrides or {})
            ),
            key=lambda n: -n.ram_bytes,
        )
        for candidate in candidates:
            rest = [n for n in chain_nodes if n is not candidate]
            try:
                plan_spans(model, rest, context_tokens=context_tokens, overrides=overrides)
            except PlanError:
                continue
            held.append(candidate)
            chain_nodes = rest
            break
        else:
            missing.append("the chain needs every other node")
            break
    plan = plan_spans(model, chain_nodes, context_tokens=context_tokens, overrides=overrides)
    pre = _Prefix(model, context_tokens)
    index = {b: i for i, b in enumerate(model.chain_order)}
    spans = [
        (index[blocks[0]], index[blocks[-1]] + 1)
        for node, blocks in plan.assignments.items()
        if node != keep_first
    ]
    replicas: dict[str, list[str]] = {}
    for backup in held:
        best: tuple[int, int] | None = None
        for a in range(len(spans)):
            for b in range(a, len(spans)):
                i, j = spans[a][0], spans[b][1]
                if not pre.fits(backup, i, j):
                    break
                if best is None or b - a > best[1] - best[0]:
                    best = (a, b)
        if best is None:
            missing.append(f"node {backup.node_id} cannot hold any span")
            continue
        i, j = spans[best[0]][0], spans[best[1]][1]
        replicas[backup.node_id] = list(model.chain_order[i:j])
    plan.backups, plan.notes = replicas, missing
    return plan


def plan_auto_context(
    model: ModelProfile,
    nodes: list[NodeCapacity],
    backups: int = 0,
    *,
    keep_first: str | None = None,
    overrides: dict[str, int] | None = None,
) -> Plan:
    """The plan with the longest context the nodes' RAM allows, up to the model's own: a
    conversation goes on longest before its oldest turns leave the model's window.

    At least ``MIN_AUTO_CONTEXT_TOKENS`` (or the model's own, when shorter): a plan that cannot
    reserve that much is refused as any plan is, saying what is missing. A longer context
    never costs a backup: the context grows only while the backups hold replicas of as many
    blocks as at the least context. Contexts are whole KV pages; the search is a bisection
    (each step one ``plan_with_backups``; about ten for a model of 8,192 tokens).
    """
    top = model.max_context or MIN_AUTO_CONTEXT_TOKENS
    floor = min(MIN_AUTO_CONTEXT_TOKENS, top)

    def plan_at(tokens: int) -> Plan:
        return plan_with_backups(
            model,
            nodes,
            backups,
            keep_first=keep_first,
            context_tokens=tokens,
            overrides=overrides,
        )

    def covered(plan: Plan) -> int:
        return sum(len(blocks) for blocks in plan.backups.values())

    best = plan_at(floor)  # raises PlanError, saying what is missing at the least context
    wanted = covered(best)
    pages = range(-(-floor // KV_PAGE_TOKENS) * KV_PAGE_TOKENS, top + 1, KV_PAGE_TOKENS)
    longer = sorted({*pages, top} - {floor})  # whole pages, and the model's own context
    low, high = 0, len(longer) - 1  # bisect: the longest that fits and keeps the backups
    while low <= high:
        middle = (low + high) // 2
        try:
            plan = plan_at(longer[middle])
        except PlanError:
            plan = None
        if plan is not None and covered(plan) >= wanted:
            best, low = plan, middle + 1
        else:
            high = middle - 1
    best.context_auto = True
    return best
