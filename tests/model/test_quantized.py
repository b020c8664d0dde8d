"""Quantized blocks: import (GGUF Q4_0/Q4_1/Q8_0 kept, HF folders quantized), the engine's
quantized layers against the dequantized reference, and perplexity against fp32.

The model is ``trained_tiny``'s: a tiny Llama that learned a made-up language, so its
perplexity is low and means something (random weights would make it chance).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers.tiny_gguf import write_llama_gguf
from tests.helpers.tiny_models import make_tiny_model, reference_model
from tests.helpers.trained_tiny import made_up_text, make_trained_model
from tiktrue.model import quant
from tiktrue.model.engine import BlockEngine, Span, split_evenly
from tiktrue.model.errors import StoreError
from tiktrue.model.importer import import_model
from tiktrue.model.quant import ProjectionSlice, QuantEmbedding, QuantLinear
from tiktrue.model.store import BlockStore

GGUF_FORMATS = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
# perplexity of a quantized model / the same model in fp32 (issue 11: 2% for 8-bit, 8% 4-bit)
PERPLEXITY_BOUND = {"int8": 1.02, "int4": 1.08}
# logits of a quantized span chain vs the fp32 forward of the same (dequantized) weights,
# as max |difference| / max |logit|: bf16 activations (8-bit mantissa) through a few layers
LOGIT_TOLERANCE = {"int8": 0.03, "int4": 0.03}
PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 3, 77]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """``(hf_folder, models_root)`` of the trained tiny model."""
    base = tmp_path_factory.mktemp("trained")
    return make_trained_model(base / "hf", steps=150), base / "models"


@pytest.fixture(scope="module")
def stores(trained):
    """``stores(kind) -> BlockStore``: the HF folder as ``fp32``/``int8``/``int4``, or a GGUF
    ``Q4_0``/``Q4_1``/``Q8_0`` imported as kept (``Q4_0``) or as fp32 (``Q4_0-fp32``)."""
    folder, models_root = trained
    made: dict[str, BlockStore] = {}

    def get(kind: str) -> BlockStore:
        if kind not in made:
            gguf_kind, _, dtype = kind.partition("-")
            if gguf_kind in GGUF_FORMATS:
                path = folder.parent / f"{gguf_kind}.gguf"
                if not path.exists():
                    write_llama_gguf(folder, path, quant=gguf_kind)
                made[kind] = import_model(path, kind, models_root, dtype=dtype or None)
            else:
                made[kind] = import_model(folder, kind, models_root, dtype=kind)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def text_ids(trained) -> list[int]:
    """A fixed text of the made-up language (not the training text), as token ids."""
    folder, _ = trained
    ids = AutoTokenizer.from_pretrained(folder)(made_up_text(1200, seed=99))["input_ids"]
    assert len(ids) >= 2000
    return ids


def perplexity(store: BlockStore, ids: list[int], window: int = 256) -> float:
    """exp(mean negative log-likelihood) of ``ids`` through the block engine, in windows."""
    engine = BlockEngine(store, split_evenly(store.manifest.model_chain_order, 1)[0])
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(ids) - 1, window)):
        chunk = torch.tensor(ids[start : start + window + 1])
        engine.open_session(f"w{n}")
        logits = engine.forward(f"w{n}", chunk[:-1], 0, all_logits=True)[0]
        engine.close_session(f"w{n}")
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


# --- import -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GGUF_FORMATS))
def test_gguf_import_keeps_quantized_weights(trained, stores, kind):
    folder, _ = trained
    store = stores(kind)
    m, fmt = store.manifest, GGUF_FORMATS[kind]
    assert (m.dtype, m.weights, store.weight_format) == ("bf16", fmt, fmt)
    for name in m.model_chain_order:
        entry = m.blocks[name]
        assert entry.format == fmt, name
        assert entry.bytes == store.block_path(name).stat().st_size  # what the planner counts
        tensors = store.load_block(name)
        matrices = [k for k, v in tensors.items() if not quant.is_quant_part(k)]
        assert all(tensors[k].dim() == 1 for k in matrices), f"{name}: a matrix kept in float"
    gguf_size = (folder.parent / f"{kind}.gguf").stat().st_size
    assert m.total_bytes <= 1.5 * gguf_size, (m.total_bytes, gguf_size)
    assert store.verify() == []


@pytest.mark.parametrize("kind", list(GGUF_FORMATS))
def test_gguf_weights_equal_the_gguf_dequantized(stores, kind):
    """Q4_0/Q4_1 are kept exactly (their fp16 scales rounded to bf16); Q8_0 becomes int8 per
    output channel, within one step of that channel's scale."""
    kept = stores(kind).load_full_state_dict()
    reference = stores(f"{kind}-fp32").load_full_state_dict()
    assert set(kept) == set(reference)
    for name, want in reference.items():
        got = kept[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if want.dim() == 1:
            assert torch.equal(got, want), name
            continue
        row_max = want.abs().amax(dim=1, keepdim=True)
        bound = row_max / 127 if kind == "Q8_0" else row_max / 64  # int4: scale rounding only
        assert ((got - want).abs() <= bound).all(), name


def test_gguf_q4_untied_head_kept_as_int4(tmp_path):
    folder = make_tiny_model(tmp_path / "hf", "llama", num_layers=2, tie_word_embeddings=False)
    path = write_llama_gguf(folder, tmp_path / "untied.gguf", quant="Q4_1")
    store = import_model(path, "untied", tmp_path / "models")
    head = store.load_block("head")
    assert set(head) == {"lm_head.weight.int4", "lm_head.weight.int4_sz", "model.norm.weight"}
    dequantized = quant.dequantize_state(head)["lm_head.weight"]
    fp32 = import_model(path, "untied-fp32", tmp_path / "models", dtype="fp32")
    want = fp32.load_block("head")["lm_head.weight"]
    assert (dequantized - want).abs().max() <= want.abs().max() / 64


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_hf_folder_quantized_at_import(trained, stores, fmt):
    folder, _ = trained
    store = stores(fmt)
    m = store.manifest
    assert (m.dtype, m.weights) == ("bf16", fmt)
    assert all(entry.format == fmt for entry in m.blocks.values())
    fp32 = stores("fp32")
    ratio = m.total_bytes / fp32.manifest.total_bytes
    assert ratio < (0.30 if fmt == "int8" else 0.20), ratio  # fp32 weights are 4 bytes each
    assert m.total_parameters == fp32.manifest.total_parameters
    engine = BlockEngine(store, split_evenly(m.model_chain_order, 1)[0])
    assert isinstance(engine.embed, QuantEmbedding) and isinstance(engine.lm_head, QuantLinear)
    linears = [mod for layer in engine.layers for mod in layer.modules()]
    assert not any(isinstance(mod, torch.nn.Linear) for mod in linears)
    # q/k/v and gate/up each run as one kernel call: 4 kernels for the 7 projections
    assert sum(isinstance(mod, QuantLinear) for mod in linears) == 4 * m.num_layers
    assert sum(isinstance(mod, ProjectionSlice) for mod in linears) == 5 * m.num_layers


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fused_projections_equal_one_kernel_per_projection(stores, fmt, monkeypatch):
    store = stores(fmt)
    span = split_evenly(store.manifest.model_chain_order, 1)[0]
    fused = BlockEngine(store, span)
    monkeypatch.setattr(quant, "FUSED_GROUPS", ())
    separate = BlockEngine(store, span)
    for engine in (fused, separate):
        engine.open_session("s")
    ids = torch.tensor([5, 17, 42, 99, 7, 250, 31])
    assert torch.equal(fused.forward("s", ids, 0), separate.forward("s", ids, 0))
    one = torch.tensor([3])
    assert torch.equal(fused.forward("s", one, 7), separate.forward("s", one, 7))


def test_unknown_weight_format_is_refused(trained, tmp_path):
    folder, _ = trained
    with pytest.raises(StoreError, match="unknown dtype 'int3'"):
        import_model(folder, "bad", tmp_path, dtype="int3")
    assert not (tmp_path / "bad").exists()


# --- the quantized layers -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (24, 64), (40, 96)])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quant_linear_equals_its_dequantized_matmul(shape, fmt):
    """Any number of outputs (int4's kernel wants a multiple of 16: padded), with a bias."""
    torch.manual_seed(0)
    weight, bias = torch.randn(shape), torch.randn(shape[0])
    stored = quant.quantize("w", weight, fmt)
    dequantized = quant.dequantize_state(stored)["w"]
    parts = {key[1:]: value for key, value in stored.items()}  # "w.int8" -> ".int8"
    layer = QuantLinear(fmt, parts, bias.bfloat16())
    x = torch.randn(3, 5, shape[1])
    got = layer(x)
    want = x @ dequantized.T + bias.bfloat16().float()
    assert got.shape == (3, 5, shape[0]) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.05 * want.abs().max().item())


def test_int4_of_a_width_without_whole_groups_falls_back_to_int8():
    stored = quant.quantize("w", torch.randn(16, 48), "int4")  # 48 is not a multiple of 32
    assert set(stored) == {"w.int8", "w.int8_scale"}


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "int8", "int4"])
def test_quantized_spans_close_to_the_dequantized_reference(stores, kind):
    store = stores(kind)
    reference_store = stores(f"{kind}-fp32" if kind in GGUF_FORMATS else "fp32")
    if kind in ("int8", "int4"):  # its own weights, dequantized, in fp32
        reference = reference_model(reference_store)
        reference.load_state_dict(store.load_full_state_dict(), strict=False)
    else:
        reference = reference_model(reference_store)
    order = store.manifest.model_chain_order  # embed, layer_0, layer_1, head
    engines = [
        BlockEngine(store, Span.of(order, "embed", "layer_0")),
        BlockEngine(store, Span.of(order, "layer_1", "head")),
    ]
    hidden = torch.tensor(PROMPT)
    for engine in engines:
        engine.open_session("s")
    hidden = engines[0].forward("s", hidden, 0)
    assert hidden.dtype == torch.bfloat16
    got = engines[1].forward("s", hidden, 0, all_logits=True)
    with torch.no_grad():
        want = reference(torch.tensor([PROMPT])).logits
    error = ((got - want).abs().max() / want.abs().max()).item()
    fmt = GGUF_FORMATS.get(kind, kind)
    assert error < LOGIT_TOLERANCE[fmt], f"{kind}: relative logit error {error:.4f}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


# --- quality: perplexity -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int8", "int4", "Q8_0", "Q4_0", "Q4_1"])
def test_perplexity_within_bound_of_fp32(stores, text_ids, kind):
    """int8/Q8_0 within 2% of fp32, 4-bit within 8%: the HF folder against its fp32 import, a
    GGUF against the same GGUF imported as fp32."""
    baseline = stores(f"{kind}-fp32" if kind in GGUF_FORMATS else "fp32")
    fp32 = perplexity(baseline, text_ids)
    vocab = baseline.manifest.vocab_size
    assert fp32 < 4, f"the model did not learn the language (perplexity {fp32:.2f} of {vocab})"
    quantized = perplexity(stores(kind), text_ids)
    bound = PERPLEXITY_BOUND[GGUF_FORMATS.get(kind, kind)]
    assert quantized / fp32 < bound, f"{kind}: perplexity {quantized:.3f} vs fp32 {fp32:.3f}"


def test_perplexity_test_catches_a_packing_mistake(trained, stores, text_ids, monkeypatch):
    """The bound is not loose: int4 with its two nibbles swapped (an easy mistake) fails it."""
    folder, models_root = trained

    def swapped(q: torch.Tensor) -> torch.Tensor:
        x = q.numpy().astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(x[:, 1::2] | (x[:, 0::2] << 4)))

    monkeypatch.setattr(quant, "pack_nibbles", swapped)
    broken = import_model(folder, "int4-swapped", models_root, dtype="int4")
    ratio = perplexity(broken, text_ids) / perplexity(stores("fp32"), text_ids)
    assert ratio > PERPLEXITY_BOUND["int4"], ratio
