"""The block engine against the ``transformers`` reference forward of the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import reference_model
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.errors import (
    CacheBudgetExceeded,
    CorruptBlock,
    PositionError,
    SessionExists,
    ShapeError,
    StoreError,
    UnknownSession,
)
from tiktrue.model.generation import LocalChain

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 3, 77]
DECODE_STEPS = 32
TOL = 1e-4


def three_spans(store) -> list[BlockEngine]:
    order = store.manifest.model_chain_order  # embed, layer_0..layer_5, head
    return [
        BlockEngine(store, Span.of(order, "embed", "layer_1")),
        BlockEngine(store, Span.of(order, "layer_2", "layer_3")),
        BlockEngine(store, Span.of(order, "layer_4", "head")),
    ]


def run_chain(engines, session, ids, start):
    x = torch.tensor(ids)
    for engine in engines[:-1]:
        x = engine.forward(session, x, start)
    return engines[-1].forward(session, x, start, all_logits=True)


def greedy_decode_logits(engines, session, prompt, steps):
    """Logits of the prompt, then of each greedy step, through the chain."""
    for engine in engines:
        engine.open_session(session)
    logits = [run_chain(engines, session, prompt, 0)[0]]
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(run_chain(engines, session, [tokens[-1]], len(tokens) - 1)[0])
    return tokens, logits


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral", "qwen3", "gemma"])
def test_three_span_chain_matches_transformers(tiny_store_factory, architecture):
    store = tiny_store_factory(architecture)
    engines = three_spans(store)
    tokens, chain_logits = greedy_decode_logits(engines, "s", PROMPT, DECODE_STEPS)

    reference = reference_model(store)
    with torch.no_grad():
        out = reference(torch.tensor([PROMPT]), use_cache=True)
        assert torch.allclose(chain_logits[0], out.logits[0], atol=TOL, rtol=0)
        cache = out.past_key_values
        for step, token in enumerate(tokens[len(PROMPT) :]):
            out = reference(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            diff = (chain_logits[step + 1] - out.logits[0]).abs().max().item()
            assert diff < TOL, f"step {step}: max |diff| {diff}"

        generated = reference.generate(
            torch.tensor([PROMPT]), max_new_tokens=DECODE_STEPS, do_sample=False, min_new_tokens=32
        )
    assert generated[0].tolist() == tokens


def test_prefill_in_pieces_equals_prefill_at_once(tiny_llama):
    """A resumed conversation sends only its new tokens: positions after a non-empty cache."""
    whole = three_spans(tiny_llama)
    pieces = three_spans(tiny_llama)
    for engine in whole + pieces:
        engine.open_session("s")
    at_once = run_chain(whole, "s", PROMPT, 0)
    first = run_chain(pieces, "s", PROMPT[:4], 0)
    second = run_chain(pieces, "s", PROMPT[4:], 4)
    assert torch.allclose(torch.cat([first, second], dim=1), at_once, atol=TOL, rtol=0)


def test_saved_session_continues_identically_in_a_fresh_engine(tiny_llama, tmp_path):
    engines = three_spans(tiny_llama)
    tokens, logits = greedy_decode_logits(engines, "s", PROMPT, 4)
    chain = LocalChain(engines)
    chain.save("s", tmp_path)

    fresh = LocalChain(three_spans(tiny_llama))
    fresh.load("s", tmp_path, history=tokens)
    assert [e.session_length("s") for e in fresh.engines] == [len(tokens)] * 3
    following = int(logits[-1][-1].argmax())
    continued = fresh.forward("s", [following], len(tokens))
    expected = chain.forward("s", [following], len(tokens))
    assert torch.equal(continued, expected)


def test_spilled_session_comes_back_and_continues_identically(tiny_llama, tmp_path):
    order = tiny_llama.manifest.model_chain_order
    span = Span(tuple(order))  # the whole model in one engine
    page_bytes = 6 * 2 * 2 * 16 * 16 * 4  # layers * k|v * kv_heads * page * head_dim * fp32
    tight = BlockEngine(tiny_llama, span, kv_budget_bytes=3 * page_bytes, spill_dir=tmp_path)
    roomy = BlockEngine(tiny_llama, span)
    prompt = PROMPT * 3  # 33 positions: 3 pages, the whole budget
    for engine in (tight, roomy):
        engine.open_session("a")
        engine.open_session("b")
        engine.forward("a", torch.tensor(prompt), 0)
    tight.forward("b", torch.tensor(PROMPT), 0)  # needs the pages of "a": "a" goes to disk
    assert tight.kv.stats().sessions_spilled == 1
    assert list(tmp_path.glob("*.npz"))
    # using "a" again brings it back (and spills "b")
    again = tight.forward("a", torch.tensor([9]), len(prompt))
    assert torch.equal(again, roomy.forward("a", torch.tensor([9]), len(prompt)))
    assert tight.kv.stats().sessions_spilled == 1


def test_corrupted_block_is_refused_by_name(tiny_store_factory):
    store = tiny_store_factory("llama", seed=1)
    path = store.block_path("layer_3")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        assert store.verify() == ["layer_3"]
        order = store.manifest.model_chain_order
        BlockEngine(store, Span.of(order, "embed", "layer_2"))  # does not need layer_3
        with pytest.raises(CorruptBlock, match="layer_3"):
            BlockEngine(store, Span.of(order, "layer_3", "head"))
    finally:
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))


def test_bad_requests_get_typed_errors(tiny_llama):
    first, middle, last = three_spans(tiny_llama)
    with pytest.raises(UnknownSession):
        first.forward("nobody", torch.tensor(PROMPT), 0)
    first.open_session("s")
    with pytest.raises(SessionExists):
        first.open_session("s")
    with pytest.raises(PositionError, match="must start at 0"):
        first.forward("s", torch.tensor(PROMPT), 3)
    first.forward("s", torch.tensor(PROMPT), 0)
    with pytest.raises(PositionError, match=f"must start at {len(PROMPT)}"):
        first.forward("s", torch.tensor([1]), len(PROMPT) + 1)
    middle.open_session("s")
    with pytest.raises(ShapeError, match="hidden states"):
        middle.forward("s", torch.zeros(1, 2, 65), 0)
    with pytest.raises(ShapeError, match="token ids"):
        first.forward("s", torch.zeros(1, 2, 64), len(PROMPT))
    with pytest.raises(ShapeError, match="token ids must lie"):
        first.forward("s", torch.tensor([10_000]), len(PROMPT))
    # a failed request leaves the session as it was
    assert first.session_length("s") == len(PROMPT)
    small = BlockEngine(tiny_llama, middle.span, kv_budget_bytes=2 * 2 * 2 * 16 * 16 * 4)
    small.open_session("s")
    with pytest.raises(CacheBudgetExceeded, match="holds 1 pages"):
        small.forward("s", torch.zeros(1, 17, 64), 0)
    with pytest.raises(CacheBudgetExceeded, match="holds no page"):
        BlockEngine(tiny_llama, middle.span, kv_budget_bytes=100)


def test_span_must_be_contiguous(tiny_llama):
    with pytest.raises(StoreError):
        BlockEngine(tiny_llama, Span(("layer_1", "layer_3")))
    with pytest.raises(StoreError, match="backwards"):
        Span.of(tiny_llama.manifest.model_chain_order, "layer_3", "layer_1")
