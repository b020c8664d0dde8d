"""The planner: contiguous spans that fit the nodes' caps, fastest first, refusals that say why."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from tiktrue.control.planner import (
    DEFAULT_RUNTIME_BYTES,
    ModelProfile,
    NodeCapacity,
    Plan,
    PlanError,
    even_plan,
    human_bytes,
    plan_spans,
)

MB = 10**6
GB = 10**9
RT = DEFAULT_RUNTIME_BYTES


def make_model(
    sizes: list[int] | None = None,
    *,
    layers: int = 10,
    layer_bytes: int = 100 * MB,
    embed: int = 50 * MB,
    head: int = 50 * MB,
    kv: int = 0,
) -> ModelProfile:
    """``sizes`` (embed, layers..., head) or uniform layers; ``kv`` bytes per token per layer."""
    if sizes is None:
        sizes = [embed, *([layer_bytes] * layers), head]
    order = ["embed", *(f"layer_{i}" for i in range(len(sizes) - 2)), "head"]
    return ModelProfile("m", order, dict(zip(order, sizes, strict=True)), kv)


def node(
    node_id: str,
    free: int,
    *,
    speed: float = 1 * MB,
    link: float = 0.0,
    disk: int = 100 * GB,
) -> NodeCapacity:
    """A node with ``free`` bytes of RAM left after the default runtime."""
    return NodeCapacity(node_id, free + RT, disk, speed, link)


def assert_valid(plan: Plan, model: ModelProfile, nodes: list[NodeCapacity], tokens: int) -> None:
    """Covers the chain contiguously, in node order, and every used node fits its caps."""
    ids = [n.node_id for n in nodes]
    used = list(plan.assignments)
    assert used == sorted(used, key=ids.index)
    assert [b for blocks in plan.assignments.values() for b in blocks] == model.chain_order
    by_id = {n.node_id: n for n in nodes}
    for detail in plan.nodes:
        cap = by_id[detail.node_id]
        assert detail.blocks
        weights = sum(model.block_bytes[b] for b in detail.blocks)
        assert detail.weight_bytes == weights
        assert detail.kv_bytes == model.kv_bytes(detail.blocks, tokens)
        assert detail.ram_needed == weights + detail.kv_bytes + cap.runtime_bytes
        assert detail.ram_needed <= cap.ram_bytes
        assert weights <= cap.disk_bytes


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(113 * MB) == "113 MB"
    assert human_bytes(1_234_567_890) == "1.2 GB"
    assert human_bytes(90 * MB) == "90 MB"
    assert human_bytes(3.4 * GB) == "3.4 GB"
    assert human_bytes(999_700_000) == "1.0 GB"


def test_profile_from_manifest() -> None:
    order = ["embed", "layer_0", "layer_1", "head"]
    manifest = SimpleNamespace(
        model_id="tiny",
        dtype="fp16",
        model_chain_order=order,
        blocks={name: SimpleNamespace(bytes=10 + i) for i, name in enumerate(order)},
    )
    config = SimpleNamespace(
        num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=None
    )
    profile = ModelProfile.from_manifest(manifest, config)
    assert profile.chain_order == order
    assert profile.block_bytes == {"embed": 10, "layer_0": 11, "layer_1": 12, "head": 13}
    assert profile.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2
    assert profile.num_layers == 2
    assert profile.compute_bytes("embed") == 0 and profile.compute_bytes("head") == 13

    manifest.dtype = "fp32"
    config = {"num_attention_heads": 4, "hidden_size": 64, "head_dim": 32}  # no GQA: kv = heads
    assert ModelProfile.from_manifest(manifest, config).kv_bytes_per_token_per_layer == (
        2 * 4 * 32 * 4
    )
    manifest.dtype = "int3"
    with pytest.raises(PlanError, match="dtype"):
        ModelProfile.from_manifest(manifest, config)


def test_fits_and_covers_the_chain() -> None:
    model = make_model(kv=1000)
    nodes = [node("A", 500 * MB), node("B", 500 * MB), node("C", 500 * MB)]
    plan = plan_spans(model, nodes, context_tokens=2048)
    assert_valid(plan, model, nodes, 2048)
    assert plan.est_ms_per_token == pytest.approx(
        sum(n.compute_ms for n in plan.nodes)  # links are 0
    )
    # 1.1 GB on 500 MB nodes needs all three
    assert list(plan.assignments) == ["A", "B", "C"]
    text = plan.describe()
    assert "ms per token" in text and all(f"  {n}:" in text for n in "ABC")


def test_refuses_with_the_missing_amount() -> None:
    # 1.1 GB of weights + 10 layers * 4096 tokens * 1000 B (40.96 MB) of KV = 1.14096 GB;
    # two nodes give 2 * 500 MB after their runtime: 140.96 MB missing.
    model = make_model(kv=1000)
    nodes = [node("A", 500 * MB), node("B", 500 * MB)]
    with pytest.raises(PlanError) as info:
        plan_spans(model, nodes, context_tokens=4096)
    message = str(info.value)
    assert "needs 141 MB more RAM" in message
    assert "1.1 GB of weights and KV for 4096 tokens" in message
    assert "the nodes give 1.0 GB" in message

    # an exact round shortfall: 3.4 GB needed, 2.2 GB given
    model = make_model(layers=32, layer_bytes=100 * MB, embed=100 * MB, head=100 * MB)
    nodes = [node("A", 1 * GB), node("B", 1200 * MB)]
    with pytest.raises(PlanError, match=r"needs 1\.2 GB more RAM: 3\.4 GB .* give 2\.2 GB"):
        plan_spans(model, nodes)


def test_refuses_missing_disk() -> None:
    model = make_model()  # 1.1 GB
    nodes = [node("A", 2 * GB, disk=400 * MB), node("B", 2 * GB, disk=500 * MB)]
    with pytest.raises(PlanError, match=r"needs 200 MB more disk"):
        plan_spans(model, nodes)


def test_faster_node_gets_more_layers() -> None:
    model = make_model(layers=12)  # 1.3 GB: needs both nodes
    nodes = [node("A", 900 * MB, speed=1 * MB), node("B", 900 * MB, speed=2 * MB)]
    plan = plan_spans(model, nodes)
    assert_valid(plan, model, nodes, 4096)
    assert len(plan.assignments["B"]) > len(plan.assignments["A"])
    # the fast node is filled to its cap: 900 MB of 100 MB layers and the 50 MB head
    assert plan.assignments["B"][-1] == "head" and plan.nodes[1].weight_bytes == 850 * MB


def test_larger_node_gets_more_layers() -> None:
    model = make_model(layers=10)
    nodes = [node("A", 400 * MB), node("B", 800 * MB)]  # same speed: balance, within the caps
    plan = plan_spans(model, nodes)
    assert_valid(plan, model, nodes, 4096)
    assert len(plan.assignments["B"]) > len(plan.assignments["A"])
    assert plan.nodes[0].weight_bytes == 350 * MB  # as much as A holds: the most even split


def test_equal_nodes_without_links_are_balanced() -> None:
    model = make_model(layers=8, embed=0, head=0)
    nodes = [node("A", 2 * GB), node("B", 2 * GB)]
    plan = plan_spans(model, nodes)
    assert [len(b) for b in plan.assignments.values()] == [5, 5]


def test_link_latency_prefers_fewer_nodes() -> None:
    model = make_model(layers=8)
    nodes = [node("A", 2 * GB), node("B", 2 * GB, link=1.0)]
    plan = plan_spans(model, nodes)
    assert list(plan.assignments) == ["A"]
    assert plan.est_ms_per_token == pytest.approx((850 * MB) / MB)
    # the first node's link is not counted: one node alone, wherever it stands
    nodes = [node("A", 100 * MB), node("B", 2 * GB, link=5.0)]
    plan = plan_spans(model, nodes)
    assert list(plan.assignments) == ["B"] and plan.nodes[0].link_ms == 0.0


def test_link_is_paid_when_the_split_is_worth_it() -> None:
    model = make_model(layers=8, embed=0, head=0)  # 800 ms on A alone
    nodes = [node("A", 2 * GB), node("B", 2 * GB, speed=4 * MB, link=2.0)]
    plan = plan_spans(model, nodes)
    assert list(plan.assignments) == ["B"]  # B alone: 200 ms, and no hop
    nodes = [node("A", 2 * GB, speed=4 * MB), node("B", 300 * MB, speed=1 * MB, link=2.0)]
    plan = plan_spans(model, nodes)
    assert list(plan.assignments) == ["A"]  # splitting adds B's slow compute and a hop


def test_override_is_honoured() -> None:
    model = make_model(layers=10)  # 12 blocks
    nodes = [node("A", 2 * GB), node("B", 2 * GB), node("C", 2 * GB, link=1.0)]
    plan = plan_spans(model, nodes, overrides={"A": 3, "B": 9, "C": 0})
    assert_valid(plan, model, nodes, 4096)
    assert [len(b) for b in plan.assignments.values()] == [3, 9]
    assert plan.assignments["A"] == ["embed", "layer_0", "layer_1"]

    # only A fixed: the others are planned around it (C has a link cost, so B takes the rest)
    plan = plan_spans(model, nodes, overrides={"A": 3})
    assert plan.assignments["A"] == ["embed", "layer_0", "layer_1"]
    assert list(plan.assignments) == ["A", "B"] and len(plan.assignments["B"]) == 9

    # a zero excludes a node that the planner would otherwise pick
    plan = plan_spans(model, nodes, overrides={"A": 0})
    assert "A" not in plan.assignments
    assert_valid(plan, model, nodes, 4096)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"A": 3, "B": 10, "C": 0}, r"overrides give 13 blocks, but the chain has only 12"),
        ({"A": 3, "B": 8, "C": 0}, r"overrides give 11 blocks to all the nodes.*12 blocks"),
        ({"A": 12, "B": 1}, r"overrides give 13 blocks, but the chain has only 12"),
        ({"Z": 3}, r"unknown node\(s\) Z"),
        ({"A": -1}, r"negative"),
    ],
)
def test_bad_override_is_refused(overrides: dict[str, int], pattern: str) -> None:
    model = make_model(layers=10)
    nodes = [node("A", 2 * GB), node("B", 2 * GB), node("C", 2 * GB)]
    with pytest.raises(PlanError, match=pattern):
        plan_spans(model, nodes, overrides=overrides)


def test_override_that_does_not_fit_is_refused() -> None:
    model = make_model(layers=10)
    nodes = [node("A", 250 * MB), node("B", 2 * GB)]  # A holds at most 3 blocks
    assert plan_spans(model, nodes, overrides={"A": 2}).assignments["A"] == ["embed", "layer_0"]
    with pytest.raises(PlanError, match=r"node A cannot hold the 4 blocks of its override"):
        plan_spans(model, nodes, overrides={"A": 4})
    # A could hold 3 blocks somewhere, but not at the start of the chain, where it stands
    model = make_model(layers=10, layer_bytes=10 * MB, embed=200 * MB, head=10 * MB)
    nodes = [node("A", 100 * MB), node("B", 2 * GB)]
    with pytest.raises(PlanError, match=r"fits with these overrides: no node can start"):
        plan_spans(model, nodes, overrides={"A": 3, "B": 9})
    assert len(plan_spans(model, nodes[::-1], overrides={"A": 3}).assignments["A"]) == 3


def test_block_too_big_for_any_node_is_named() -> None:
    model = make_model(layers=10, layer_bytes=10 * MB, embed=10 * MB, head=113 * MB)
    nodes = [node("A", 90 * MB), node("B", 90 * MB), node("C", 90 * MB)]  # 270 MB >= 223 MB
    with pytest.raises(PlanError) as info:
        plan_spans(model, nodes)
    assert str(info.value) == ("block head (113 MB) fits on no node: the largest free RAM is 90 MB")


def test_contiguity_failure_is_explained() -> None:
    model = make_model([10 * MB, 100 * MB, 100 * MB, 10 * MB], kv=0)
    # every block fits somewhere and 230 MB >= 220 MB, but in order the head is left over
    nodes = [node("C", 15 * MB), node("A", 110 * MB), node("B", 105 * MB)]
    with pytest.raises(
        PlanError, match=r"at most embed\.\.layer_1, and head \(10 MB with KV\) does not fit"
    ):
        plan_spans(model, nodes)


def test_invalid_inputs() -> None:
    model = make_model()
    with pytest.raises(PlanError, match="no nodes"):
        plan_spans(model, [])
    with pytest.raises(PlanError, match="twice: A"):
        plan_spans(model, [node("A", GB), node("A", GB)])
    with pytest.raises(PlanError, match="speed"):
        NodeCapacity("A", GB, GB, 0.0)


def test_even_plan() -> None:
    model = make_model(layers=10, kv=100)  # 12 blocks
    plan = even_plan(model, ["A", "B", "C", "D", "E"], context_tokens=16)
    assert [len(b) for b in plan.assignments.values()] == [3, 3, 2, 2, 2]
    assert [b for blocks in plan.assignments.values() for b in blocks] == model.chain_order
    assert plan.nodes[0].kv_bytes == 2 * 100 * 16
    assert plan.est_ms_per_token == 0.0
    nodes = [node("A", GB, link=3.0), node("B", GB, link=1.0)]
    timed = even_plan(model, nodes)
    assert timed.est_ms_per_token == pytest.approx(500 + 550 + 1.0)
    with pytest.raises(PlanError):
        even_plan(model, [str(i) for i in range(13)])


def _brute_force(
    model: ModelProfile, nodes: list[NodeCapacity], tokens: int
) -> tuple[float, float] | None:
    """The best (total ms, slowest node ms) over every split, by enumeration."""
    order, best = model.chain_order, None
    for cuts in itertools.combinations_with_replacement(range(len(order) + 1), len(nodes) - 1):
        bounds = [0, *cuts, len(order)]
        total, slowest, used, ok = 0.0, 0.0, 0, True
        for n, (i, j) in zip(nodes, itertools.pairwise(bounds), strict=True):
            if i == j:
                continue
            blocks = order[i:j]
            weights = sum(model.block_bytes[b] for b in blocks)
            if (
                weights + model.kv_bytes(blocks, tokens) + n.runtime_bytes > n.ram_bytes
                or weights > n.disk_bytes
            ):
                ok = False
                break
            ms = sum(model.compute_bytes(b) for b in blocks) / n.bytes_per_ms
            total += ms + (n.link_ms if used else 0.0)
            slowest = max(slowest, ms)
            used += 1
        if ok and (best is None or (total, slowest) < best):
            best = (total, slowest)
    return best


def test_matches_brute_force_on_small_instances() -> None:
    rng = random.Random(20240611)
    solved = refused = 0
    for _ in range(150):
        sizes = [rng.randint(1, 60) * MB for _ in range(8)]
        model = make_model(sizes, kv=rng.choice([0, 500, 2000]))
        tokens = rng.choice([256, 4096])
        nodes = [
            NodeCapacity(
                name,
                ram_bytes=rng.randint(60, 400) * MB,
                disk_bytes=rng.randint(50, 400) * MB,
                bytes_per_ms=rng.uniform(0.5, 4.0) * MB,
                link_ms=rng.choice([0.0, rng.uniform(0.0, 30.0)]),
                runtime_bytes=rng.choice([0, 20 * MB]),
            )
            for name in "ABC"
        ]
        expected = _brute_force(model, nodes, tokens)
        if expected is None:
            with pytest.raises(PlanError):
                plan_spans(model, nodes, context_tokens=tokens)
            refused += 1
            continue
        plan = plan_spans(model, nodes, context_tokens=tokens)
        assert_valid(plan, model, nodes, tokens)
        assert plan.est_ms_per_token == pytest.approx(expected[0], rel=1e-9)
        assert plan.max_node_ms == pytest.approx(expected[1], rel=1e-9)
        solved += 1
    assert solved > 30 and refused > 10  # both outcomes were exercised


def test_a_large_instance_is_planned() -> None:
    """102 blocks over 20 nodes (the planner's speed is measured in bench/, not asserted)."""
    rng = random.Random(7)
    model = make_model([rng.randint(50, 200) * MB for _ in range(102)], kv=4096)
    nodes = [
        node(f"n{i}", rng.randint(1, 4) * GB, speed=rng.uniform(1, 8) * MB, link=0.3)
        for i in range(20)
    ]
    plan = plan_spans(model, nodes, context_tokens=4096)
    assert_valid(plan, model, nodes, 4096)
    assert len(plan.assignments) > 3  # about 12 GB of blocks over nodes of 1-4 GB


def _with_context(model: ModelProfile, tokens: int | None) -> ModelProfile:
    return ModelProfile(
        model.model_id,
        model.chain_order,
        model.block_bytes,
        model.kv_bytes_per_token_per_layer,
        max_context=tokens,
    )


def test_the_context_is_as_long_as_the_nodes_allow_up_to_the_models_own() -> None:
    """Unless the admin chooses, every node reserves the longest context its RAM leaves room
    for, in whole KV pages, up to the model's own; never less than 2,048 tokens (or the
    model's own when shorter): below that the plan is refused, saying what is missing."""
    from tiktrue.control.planner import plan_with_backups
    from tiktrue.limits import KV_PAGE_TOKENS, MIN_AUTO_CONTEXT_TOKENS

    model = _with_context(make_model(kv=10_000), 8192)  # 10 layers: 100 KB per token
    roomy = [node("A", 2 * GB), node("B", 2 * GB)]
    plan = plan_with_backups(model, roomy, 0)
    assert (plan.context_tokens, plan.context_auto) == (8192, True)
    assert_valid(plan, model, roomy, 8192)
    assert "as much as the nodes' memory allows" in plan.describe()

    # 1.1 GB of weights, 1.5 GB of RAM: 400 MB of KV, 4,000 tokens (whole pages)
    tight = [node("A", 750 * MB), node("B", 750 * MB)]
    plan = plan_with_backups(model, tight, 0)
    assert 4000 - KV_PAGE_TOKENS < plan.context_tokens <= 4000
    assert plan.context_tokens % KV_PAGE_TOKENS == 0
    assert_valid(plan, model, tight, plan.context_tokens)
    with pytest.raises(PlanError):  # one page more does not fit
        plan_spans(model, tight, context_tokens=plan.context_tokens + KV_PAGE_TOKENS)

    chosen = plan_with_backups(model, tight, 0, context_tokens=1024)  # the admin's
    assert (chosen.context_tokens, chosen.context_auto) == (1024, False)
    too_small = [node("A", 600 * MB), node("B", 600 * MB)]  # 100 MB of KV: 1,000 tokens
    with pytest.raises(PlanError, match=f"KV for {MIN_AUTO_CONTEXT_TOKENS} tokens"):
        plan_with_backups(model, too_small, 0)
    short = _with_context(model, 512)  # a model of 512 tokens: its own, on any nodes
    assert plan_with_backups(short, too_small, 0).context_tokens == 512
    assert plan_with_backups(_with_context(model, 1000), roomy, 0).context_tokens == 1000


def test_a_longer_context_never_costs_a_backup() -> None:
    """With a backup wanted, the context grows only while the backup still holds a replica
    of as many blocks as at the least context."""
    from tiktrue.control.planner import plan_with_backups

    model = _with_context(make_model(layers=6, kv=10_000), 32768)
    nodes = [
        node("n0", 300 * MB),
        node("n1", 400 * MB),
        node("n2", 400 * MB),
        node("big", 700 * MB),
    ]

    def replicated(plan: Plan) -> int:
        return sum(len(blocks) for blocks in plan.backups.values())

    least = plan_with_backups(model, nodes, 1, keep_first="n0", context_tokens=2048)
    assert replicated(least) == 5  # the backup holds all but the admin's span
    plan = plan_with_backups(model, nodes, 1, keep_first="n0")
    assert plan.context_tokens > 2048 and replicated(plan) >= replicated(least)
    worse = plan_with_backups(model, nodes, 1, keep_first="n0", context_tokens=4000)
    assert replicated(worse) < replicated(least)  # a longer one fits, at the backup's cost
