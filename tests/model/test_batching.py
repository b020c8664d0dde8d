"""Continuous batching in the block engine: the decode steps of several sessions run as one
forward and give what the same steps give one by one."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import make_tiny_model
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.errors import PositionError, ShapeError, UnknownSession
from tiktrue.model.importer import import_model

PROMPTS = [[5, 17, 42, 99, 7], [250, 31], [64, 12, 3, 77, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
STEPS = 24


def three_spans(store) -> list[BlockEngine]:
    order = store.manifest.model_chain_order
    return [
        BlockEngine(store, Span.of(order, "embed", "layer_1")),
        BlockEngine(store, Span.of(order, "layer_2", "layer_3")),
        BlockEngine(store, Span.of(order, "layer_4", "head")),
    ]


def prefill(engines, prompts) -> list[torch.Tensor]:
    """Open a session per prompt and run its prompt alone; the last logits of each."""
    logits = []
    for n, prompt in enumerate(prompts):
        x = torch.tensor(prompt)
        for engine in engines:
            engine.open_session(f"s{n}")
            x = engine.forward(f"s{n}", x, 0)
        logits.append(x)
    return logits


def decode_one_by_one(engines, prompts, steps):
    last = prefill(engines, prompts)
    tokens = [[int(x.argmax())] for x in last]
    logits = [[] for _ in prompts]
    for i in range(steps):
        for n, prompt in enumerate(prompts):
            x = torch.tensor(tokens[n][-1:])
            for engine in engines:
                x = engine.forward(f"s{n}", x, len(prompt) + i)
            logits[n].append(x[0])
            tokens[n].append(int(x.argmax()))
    return tokens, logits


def decode_batched(engines, prompts, steps, feed=None):
    """Greedy steps of every session as one batch; ``feed``: tokens to feed instead."""
    last = prefill(engines, prompts)
    tokens = [[int(x.argmax())] for x in last]
    logits = [[] for _ in prompts]
    for i in range(steps):
        xs = [
            torch.tensor(t[-1:] if feed is None else f[i : i + 1])
            for t, f in zip(tokens, feed or tokens, strict=True)
        ]
        for engine in engines:
            starts = [len(p) + i for p in prompts]
            out = engine.forward_batch(
                list(zip([f"s{n}" for n in range(len(prompts))], xs, starts, strict=True))
            )
            assert not any(isinstance(x, Exception) for x in out), out
            xs = out
        for n, x in enumerate(xs):
            logits[n].append(x[0])
            tokens[n].append(int(x.argmax()))
    return tokens, logits


@pytest.mark.parametrize(
    ("architecture", "options"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("gemma", {}),
        ("mistral", {"sliding_window": 8}),  # sessions cross the window mid-decode
    ],
)
def test_batched_decode_equals_one_by_one(tiny_store_factory, architecture, options):
    store = tiny_store_factory(architecture, **options)
    alone_tokens, alone_logits = decode_one_by_one(three_spans(store), PROMPTS, STEPS)
    batch_tokens, batch_logits = decode_batched(three_spans(store), PROMPTS, STEPS)
    assert batch_tokens == alone_tokens
    for n in range(len(PROMPTS)):
        for step, (a, b) in enumerate(zip(alone_logits[n], batch_logits[n], strict=True)):
            assert torch.equal(a, b), f"session {n}, step {step}: max |diff| {(a - b).abs().max()}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_batched_decode_equals_one_by_one_with_quantized_weights(fmt, tmp_path):
    """int8/int4 weights (bf16 activations) too: the same bits, so the same tokens."""
    folder = make_tiny_model(tmp_path / "hf", "llama")
    store = import_model(folder, f"tiny-{fmt}", tmp_path / "models", dtype=fmt)
    tokens, alone_logits = decode_one_by_one(three_spans(store), PROMPTS, 8)
    batch_tokens, batch_logits = decode_batched(three_spans(store), PROMPTS, 8)
    assert batch_tokens == tokens
    for n in range(len(PROMPTS)):
        for a, b in zip(alone_logits[n], batch_logits[n], strict=True):
            assert torch.equal(a, b)


def test_a_bad_step_fails_alone(tiny_llama):
    first, *_ = three_spans(tiny_llama)
    for sid in ("a", "b", "c"):
        first.open_session(sid)
        first.forward(sid, torch.tensor([5, 6, 7]), 0)
    reference, *_ = three_spans(tiny_llama)
    for sid in ("a", "c"):
        reference.open_session(sid)
        reference.forward(sid, torch.tensor([5, 6, 7]), 0)
    out = first.forward_batch(
        [
            ("a", torch.tensor([9]), 3),
            ("b", torch.tensor([9]), 5),  # wrong position
            ("nobody", torch.tensor([9]), 0),
            ("c", torch.tensor([9, 10]), 3),  # two positions: a prefill chunk in the batch
            ("a", torch.tensor([10]), 4),  # the same session again: runs after its first step
            ("b", torch.zeros(1, 1, 64), 3),  # hidden states where token ids go
        ]
    )
    assert isinstance(out[1], PositionError)
    assert isinstance(out[2], UnknownSession)
    assert isinstance(out[5], ShapeError)
    assert torch.equal(out[0], reference.forward("a", torch.tensor([9]), 3))
    assert torch.equal(out[3], reference.forward("c", torch.tensor([9, 10]), 3))
    assert torch.equal(out[4], reference.forward("a", torch.tensor([10]), 4))
    assert [first.session_length(s) for s in "abc"] == [5, 3, 5]


def test_a_batch_never_spills_its_own_sessions(tiny_llama, tmp_path):
    """With pages for only part of a batch, the steps that do not fit run alone after it
    (spilling the others then), and every result equals the roomy engine's."""
    order = tiny_llama.manifest.model_chain_order
    span = Span(tuple(order))
    page_bytes = 6 * 2 * 2 * 16 * 16 * 4  # layers * k|v * kv_heads * page * head_dim * fp32
    tight = BlockEngine(tiny_llama, span, kv_budget_bytes=2 * page_bytes, spill_dir=tmp_path)
    roomy = BlockEngine(tiny_llama, span)
    steps = []
    for n, sid in enumerate(("a", "b")):
        for engine in (tight, roomy):
            engine.open_session(sid)
            engine.forward(sid, torch.arange(16) + n, 0)  # one full page each
        steps.append((sid, torch.tensor([3]), 16))  # the 17th position needs a new page
    got = tight.forward_batch(steps)
    want = [roomy.forward(*step) for step in steps]
    for g, w in zip(got, want, strict=True):
        assert not isinstance(g, Exception), g
        assert torch.allclose(g, w, atol=1e-5)


def test_a_batch_never_reads_memory_no_step_wrote(tiny_llama):
    """The pool starts as whatever the allocator left (``torch.empty``): a batched step reads
    each row's last page past its length and pads shorter rows, all masked, and attention
    multiplies the masked weights (0) by those values. Poisoned with NaN here, as freed memory
    may be: every row must still come out finite and equal to the same step alone."""
    engines = three_spans(tiny_llama)
    for engine in engines:
        engine.kv.pool.fill_(float("nan"))
    prefill(engines, PROMPTS)
    alone = three_spans(tiny_llama)
    prefill(alone, PROMPTS)
    steps = [(f"s{n}", torch.tensor([9 + n]), len(p)) for n, p in enumerate(PROMPTS)]
    xs = [x for _, x, _ in steps]
    want = []
    for sid, x, start in steps:
        for engine in alone:
            x = engine.forward(sid, x, start)
        want.append(x)
    for engine in engines:
        xs = engine.forward_batch(
            [(sid, x, start) for (sid, _, start), x in zip(steps, xs, strict=True)]
        )
    for got, expected in zip(xs, want, strict=True):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, expected, atol=1e-5)
