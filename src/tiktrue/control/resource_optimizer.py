"""``resource_optimizer`` (seed 000, phase 8): which PC slows a network's chain, and a faster
plan.

``analyze_workload_patterns`` reads the metrics history (``monitoring.history``: every answer's
decode steps, per node and plan their compute, the time they waited there, the ping of the
node's link to the next; the heartbeats' CPU) of the current plan (config version), and says
per hop what a token costs there: its compute, its wait in the node's queue, and half its
link's round trip. The hop with the largest share slows the chain; a node busy with other
programs shows in its CPU.

``dynamic_load_balancing`` turns the measured compute into each node's speed (weight bytes per
millisecond: a CPU decode step is bound by the bytes it reads, so a node's speed is its span's
bytes over its compute per step) and asks the planner for the fastest split with those speeds,
within each node's caps; nodes that served nothing in the window keep their probe's speed. It
compares the new plan's time per token with the current split's under the same speeds, and
recommends it only when it saves at least ``MIN_GAIN_RATIO`` of the time. Nothing changes until
the admin applies it (``apply_rebalance``: the same push and switch as ``network apply``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tiktrue.control import network_admin as na
from tiktrue.control import plans
from tiktrue.control.planner import ModelProfile, NodeCapacity, Plan, plan_with_backups
from tiktrue.model.store import BlockStore
from tiktrue.monitoring.history import HOP_SUMS, HistoryStore
from tiktrue.protocol.network_config import NetworkConfig

DEFAULT_WINDOW_S = 24 * 3600.0  # the history read when the admin names no period
MIN_STEPS = 20  # decode steps through a node before its figures count as a measurement
MIN_GAIN_RATIO = 0.10  # a plan must save this share of the time per token to be proposed
MIN_GAIN_MS = 0.5  # ... and at least this much (below it, noise of a loaded PC)


class NotEnoughHistory(Exception):
    """The history holds too few decode steps to measure the chain."""


@dataclass
class Hop:
    """One node of the chain, as the history measured it: per decode step (a token)."""

    node_id: str
    name: str
    blocks: list[str]
    steps: int
    compute_ms: float  # its own compute
    wait_ms: float  # waiting there: its queue (other sessions' work) and framing
    link_ms: float | None  # the ping round trip of its link to the next node (the head's: back)
    cpu_percent: float | None = None  # the PC's CPU load (heartbeats), all programs together
    share: float = 0.0  # of the chain's time per token

    @property
    def ms(self) -> float:
        """What a token spends here: compute, wait, and the one-way hop to the next node."""
        return self.compute_ms + self.wait_ms + (self.link_ms or 0.0) / 2

    @property
    def span(self) -> str:
        return f"{self.blocks[0]}..{self.blocks[-1]}" if self.blocks else "-"


@dataclass
class WorkloadAnalysis:
    network_id: str
    since: float
    until: float
    answers: int
    decode_steps: int
    ms_per_token: float | None  # the gateway's measured decode round trip
    transit_ms: float | None  # per token between nodes (network, TLS, framing, queues)
    hops: list[Hop] = field(default_factory=list)
    busiest_hour: int | None = None  # UTC hour with the most generated tokens

    @property
    def slowest(self) -> Hop | None:
        return max(self.hops, key=lambda h: h.ms, default=None)

    def describe(self) -> str:
        lines = [
            f"network {self.network_id}: {self.decode_steps} tokens in {self.answers} answers "
            f"since {_when(self.since)}"
            + (f", {self.ms_per_token:.1f} ms per token" if self.ms_per_token else "")
            + (f" ({self.transit_ms:.1f} ms between nodes)" if self.transit_ms is not None else "")
        ]
        for hop in self.hops:
            link = f", link {hop.link_ms:.1f} ms" if hop.link_ms is not None else ""
            cpu = f", CPU {hop.cpu_percent:.0f}%" if hop.cpu_percent is not None else ""
            lines.append(
                f"  {hop.name or hop.node_id}: {hop.span} compute {hop.compute_ms:.1f} ms, "
                f"waits {hop.wait_ms:.1f} ms{link}{cpu} -> {hop.share:.0%} of a token"
            )
        slowest = self.slowest
        if slowest is not None:
            lines.append(f"  slowest: {slowest.name or slowest.node_id} ({_why(slowest)})")
        return "\n".join(lines)


@dataclass
class Rebalance:
    """The measured chain, the plan the planner makes with the measured speeds, the gain."""

    analysis: WorkloadAnalysis
    plan: Plan
    current_ms: float  # the current split's time per token, with the measured speeds
    planned_ms: float
    speeds: dict[str, float]  # node -> weight bytes per ms (measured, else probed)
    measured: set[str]  # the nodes whose speed the history measured
    changes: dict[str, tuple[str, str]]  # node -> (span now, span planned)
    config_version: int  # the network's config the plan was made against

    @property
    def gain_ms(self) -> float:
        return self.current_ms - self.planned_ms

    @property
    def gain_ratio(self) -> float:
        return self.gain_ms / self.current_ms if self.current_ms > 0 else 0.0

    @property
    def worth_it(self) -> bool:
        return bool(self.changes) and (
            self.gain_ratio >= MIN_GAIN_RATIO and self.gain_ms >= MIN_GAIN_MS
        )

    def verdict(self) -> str:
        if not self.changes:
            return "the current plan is already the fastest the planner finds"
        if not self.worth_it:
            return (
                f"a new plan would save only {self.gain_ms:.1f} ms per token "
                f"({self.gain_ratio:.0%}): not worth moving blocks"
            )
        return (
            f"a new plan: ~{self.planned_ms:.1f} instead of ~{self.current_ms:.1f} ms per token "
            f"of compute and links ({self.gain_ratio:.0%} faster)"
        )

    def describe(self) -> str:
        lines = [self.analysis.describe(), self.verdict()]
        for node_id, (now, planned) in self.changes.items():
            lines.append(f"  {node_id}: {now} -> {planned}")
        return "\n".join(lines)


def analyze_workload_patterns(
    config: NetworkConfig,
    hop_rows: list[dict],
    node_rows: list[dict],
    usage_rows: list[dict],
    *,
    since: float,
    until: float,
) -> WorkloadAnalysis:
    """Per hop of ``config``'s chain (its replica chains' backups too, where they served),
    what a token costs there under ``config``'s plan, from the history's rows of
    ``since..until`` (``HistoryStore``'s ``hops``, ``nodes``: their CPU, and ``usage``)."""
    network = config.network_id
    usage = [r for r in usage_rows if r["network_id"] == network]
    steps = sum(r["decode_steps"] for r in usage)
    decode_s = sum(r["decode_s"] for r in usage)
    by_hour: dict[int, int] = {}
    for row in usage:
        hour = int(row["start"] // 3600 % 24)
        by_hour[hour] = by_hour.get(hour, 0) + row["completion_tokens"]
    sums: dict[str, dict[str, float]] = {}
    for row in hop_rows:
        if row["network_id"] == network and row["version"] == config.version:
            held = sums.setdefault(row["node_id"], {})
            for name in HOP_SUMS:
                held[name] = held.get(name, 0) + row[name]
    for row in node_rows:
        if row["network_id"] == network:
            held = sums.setdefault(row["node_id"], {})
            held["cpu_sum"] = held.get("cpu_sum", 0) + row["cpu_sum"]
            held["samples"] = held.get("samples", 0) + row["samples"]
    serving = [*config.chain(), *config.backups()]
    hops = []
    for entry in serving:
        held = sums.get(entry.node_id) or {}
        count = int(held.get("steps", 0))
        if entry.role == "backup" and count == 0:
            continue  # a backup that served no replica chain in the window
        samples = held.get("link_samples", 0)
        hops.append(
            Hop(
                node_id=entry.node_id,
                name=entry.name,
                blocks=list(entry.blocks),
                steps=count,
                compute_ms=held.get("compute_ms", 0.0) / count if count else 0.0,
                wait_ms=held.get("wait_ms", 0.0) / count if count else 0.0,
                link_ms=held["link_ms"] / samples if samples else None,
                cpu_percent=held["cpu_sum"] / held["samples"] if held.get("samples") else None,
            )
        )
    total = sum(h.ms for h in hops)
    for hop in hops:
        hop.share = hop.ms / total if total > 0 else 0.0
    return WorkloadAnalysis(
        network_id=network,
        since=since,
        until=until,
        answers=sum(r["answers"] for r in usage),
        decode_steps=steps,
        ms_per_token=decode_s * 1000 / steps if steps else None,
        transit_ms=sum(r.get("transit_ms") or 0.0 for r in usage) / steps if steps else None,
        hops=hops,
        busiest_hour=max(by_hour, key=by_hour.__getitem__) if by_hour else None,
    )


def dynamic_load_balancing(
    analysis: WorkloadAnalysis,
    config: NetworkConfig,
    model: ModelProfile,
    capacities: list[NodeCapacity],
    *,
    admin_id: str,
) -> Rebalance:
    """The planner's fastest split with each node's measured speed (``capacities``: every
    node's caps and probe, ``network_admin.capacities``), and the current split's time under
    the same speeds. Raises ``NotEnoughHistory`` when no node of the chain was measured."""
    chain = config.chain()
    measured: dict[str, float] = {}
    for hop in analysis.hops:
        work = sum(model.compute_bytes(b) for b in hop.blocks)
        if hop.steps >= MIN_STEPS and hop.compute_ms > 0 and work > 0:
            measured[hop.node_id] = work / hop.compute_ms
    if not any(n.node_id in measured for n in chain):
        raise NotEnoughHistory(
            f"network {config.network_id}: fewer than {MIN_STEPS} decode steps per node in the "
            "history since its plan took effect; chat a little, then ask again"
        )
    links = {h.node_id: h.link_ms / 2 for h in analysis.hops if h.link_ms is not None}
    previous = {b.node_id: a.node_id for a, b in zip(chain, chain[1:], strict=False)}
    nodes = []
    for cap in capacities:
        speed = measured.get(cap.node_id, cap.bytes_per_ms)
        link = links.get(previous.get(cap.node_id, ""), cap.link_ms)
        nodes.append(
            NodeCapacity(
                node_id=cap.node_id,
                ram_bytes=cap.ram_bytes,
                disk_bytes=cap.disk_bytes,
                bytes_per_ms=speed,
                link_ms=link,
                runtime_bytes=cap.runtime_bytes,
            )
        )
    speeds = {n.node_id: n.bytes_per_ms for n in nodes}
    plan = plan_with_backups(
        model,
        nodes,
        config.backup_nodes,
        keep_first=admin_id,
        # the admin's context stays; one the planner chose is chosen again
        context_tokens=None if config.context_auto else config.context_tokens,
    )
    link_of = {n.node_id: n.link_ms for n in nodes}
    current = 0.0
    for i, entry in enumerate(chain):
        speed = speeds.get(entry.node_id)
        if speed is None:  # a chain node that no longer reports (offline): no comparison
            speed = min(speeds.values())
        current += sum(model.compute_bytes(b) for b in entry.blocks) / speed
        current += link_of.get(entry.node_id, 0.0) if i else 0.0
    now = {n.node_id: _span(n.blocks) for n in chain}
    planned = {node: _span(blocks) for node, blocks in plan.assignments.items()}
    changes = {
        node: (now.get(node, "-"), planned.get(node, "-"))
        for node in sorted(set(now) | set(planned))
        if now.get(node) != planned.get(node)
    }
    return Rebalance(
        analysis=analysis,
        plan=plan,
        current_ms=current,
        planned_ms=plan.est_ms_per_token,
        speeds=speeds,
        measured=set(measured),
        changes=changes,
        config_version=config.version,
    )


async def rebalance_report(
    data_dir: Path, network_id: str, *, since: float | None = None
) -> Rebalance:
    """Measure (the current plan's history since ``since``, default a day ago; every node's
    caps and probe) and propose (see the module's docstring)."""
    config, credentials = na.load(data_dir, network_id)
    until = time.time()
    since = until - DEFAULT_WINDOW_S if since is None else since
    history = HistoryStore(data_dir)
    try:
        rows = history.hops(since, until), history.nodes(since, until), history.usage(since, until)
        analysis = analyze_workload_patterns(config, *rows, since=since, until=until)
    finally:
        history.close()
    status = await na.network_status(data_dir, network_id, probe=True)
    for hop in analysis.hops:  # the heartbeats' CPU now, where the history has none
        node = next((n for n in status["nodes"] if n["node_id"] == hop.node_id), None)
        beat = (node or {}).get("stats") or {}
        if hop.cpu_percent is None and beat.get("cpu_percent") is not None:
            hop.cpu_percent = beat["cpu_percent"]
    store = BlockStore(Path(data_dir) / "models" / config.model_id)
    model = ModelProfile.from_manifest(store.manifest, store.config())
    return dynamic_load_balancing(
        analysis,
        config,
        model,
        plans.capacities(status),
        admin_id=credentials.identity.node_id,
    )


async def apply_rebalance(data_dir: Path, network_id: str, rebalance: Rebalance, **options):
    """The admin's OK: push each node the blocks of its new span and switch the chain (as
    ``network apply``; ``options``: ``progress``). Raises ``ConfigChanged`` when the network
    moved on since the analysis (analyse again)."""
    return await plans.apply_plan(
        data_dir, network_id, rebalance.plan, planned_against=rebalance.config_version, **options
    )


def _why(hop: Hop) -> str:
    parts = {"compute": hop.compute_ms, "waiting in its queue": hop.wait_ms}
    if hop.link_ms:
        parts["its link"] = hop.link_ms / 2
    what = max(parts, key=parts.__getitem__)
    busy = f"; its PC is {hop.cpu_percent:.0f}% busy" if (hop.cpu_percent or 0) >= 80 else ""
    return f"{hop.share:.0%} of a token, mostly {what}{busy}"


def _span(blocks: list[str]) -> str:
    return f"{blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else "".join(blocks)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")
