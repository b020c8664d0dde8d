"""Importing a GGUF file: the same block store as importing the Hugging Face folder it came from.

No GGUF is downloaded: ``tests.helpers.tiny_gguf`` writes one from a tiny random Llama folder the
way llama.cpp's converter does (GGUF tensor names, permuted attn_q / attn_k rows, a ``gpt2``
tokenizer with merges and the chat template in the metadata).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from tests.helpers.tiny_gguf import hf_state_dict, permute_like_llama_cpp, write_llama_gguf
from tests.helpers.tiny_models import CHATML, make_tiny_model, reference_model
from tiktrue.model.catalog import CATALOG
from tiktrue.model.errors import ModelError, StoreError, UnsupportedArchitecture
from tiktrue.model.importer import import_model
from tiktrue.model.store import BlockStore

NUM_LAYERS = 3
SENTENCES = [
    "TikTrue runs one language model across the computers of a local network.",
    "Hello, world!  What is   the capital of Frañce? 0123456789 \U0001f642\n\ttabs",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of France?"},
]
CONFIG_KEYS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
]
IMPORT_TIMEOUT_S = 60


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_source(request, tmp_path_factory) -> tuple[Path, BlockStore, Path]:
    """``(hf_folder, hf_store, models_root)``: a tiny Llama folder and its HF import."""
    tie = request.param
    base = tmp_path_factory.mktemp(f"gguf-{request.param_index}")
    folder = make_tiny_model(base / "hf", "llama", num_layers=NUM_LAYERS, tie_word_embeddings=tie)
    models_root = base / "models"
    return folder, import_model(folder, "tiny-hf", models_root), models_root


def _import_gguf(hf_source, variant: str) -> BlockStore:
    folder, _, models_root = hf_source
    path = write_llama_gguf(
        folder,
        folder.parent / f"tiny-{variant}.gguf",
        half=variant == "f16",
        reverse=variant == "f32-reversed",
    )
    return import_model(path, f"tiny-gguf-{variant}", models_root)


@pytest.fixture(scope="module")
def gguf_stores(hf_source):
    """``variant -> BlockStore``: the GGUF import of ``hf_source``, made once per variant."""
    made: dict[str, BlockStore] = {}

    def get(variant: str) -> BlockStore:
        if variant not in made:
            made[variant] = _import_gguf(hf_source, variant)
        return made[variant]

    return get


@pytest.fixture(scope="module")
def gguf_store(gguf_stores) -> BlockStore:
    return gguf_stores("f32")


# --- the writer itself ----------------------------------------------------------------------


def test_llama_cpp_permutation_is_undone_by_transformers():
    rows, cols, heads, kv_heads = 32, 8, 4, 2
    q = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    k = q[: rows // 2]
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    )
    permuted_q = permute_like_llama_cpp(q, heads, heads)
    permuted_k = permute_like_llama_cpp(k, heads, kv_heads)
    assert not np.array_equal(permuted_q, q) and not np.array_equal(permuted_k, k)
    back_q = processor.process(permuted_q, "blk.0.attn_q.weight").weights
    back_k = processor.process(permuted_k, "blk.0.attn_k.weight").weights
    assert np.array_equal(back_q, q) and np.array_equal(back_k, k)


def test_written_gguf_holds_permuted_llama_tensors(hf_source):
    folder, _, _ = hf_source
    path = write_llama_gguf(folder, folder.parent / "inspect.gguf")
    reader = GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    hf = hf_state_dict(folder)
    assert ("output.weight" in tensors) == ("lm_head.weight" in hf)
    assert len(tensors) == len(hf)
    assert np.array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"].numpy())
    # attn_q is stored permuted, so an import that forgot to undo it would not match
    q = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert tensors["blk.0.attn_q.weight"].shape == q.shape
    assert not np.array_equal(tensors["blk.0.attn_q.weight"], q)
    v = hf["model.layers.0.self_attn.v_proj.weight"].numpy()
    assert np.array_equal(tensors["blk.0.attn_v.weight"], v)


# --- a good GGUF ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["f32", "f32-reversed", "f16"])
def test_gguf_blocks_equal_hf_blocks(hf_source, gguf_stores, variant):
    _, hf_store, _ = hf_source
    store = gguf_stores(variant)
    hf_m, m = hf_store.manifest, store.manifest
    assert m.model_chain_order == hf_m.model_chain_order
    assert len(m.model_chain_order) == NUM_LAYERS + 2
    assert (m.architecture, m.num_layers, m.hidden_size, m.vocab_size) == (
        hf_m.architecture,
        hf_m.num_layers,
        hf_m.hidden_size,
        hf_m.vocab_size,
    )
    assert m.dtype == "fp32" and m.source.endswith(".gguf")
    assert set(m.blocks) == set(hf_m.blocks)
    assert store.verify() == []
    for block in m.model_chain_order:
        expected, got = hf_store.load_block(block), store.load_block(block)
        assert set(got) == set(expected), block
        for name, want in expected.items():
            assert got[name].dtype == torch.float32, name
            if variant == "f16" and want.dim() > 1:  # norms stay F32, as llama.cpp writes them
                torch.testing.assert_close(got[name], want, rtol=1e-3, atol=1e-5)
                want = want.half().float()  # exactly the fp16 rounding, nothing more
            assert torch.equal(got[name], want), f"{block}: {name}"
    assert BlockStore(store.root).manifest == m  # reloads from disk


def test_head_carries_embedding_when_tied(hf_source, gguf_store):
    folder, _, _ = hf_source
    tied = AutoConfig.from_pretrained(folder).tie_word_embeddings
    assert gguf_store.config().tie_word_embeddings == tied
    embedding = gguf_store.load_block("embed")["model.embed_tokens.weight"]
    head = gguf_store.load_block("head")
    assert set(head) == {"lm_head.weight", "model.norm.weight"}
    if tied:
        assert torch.equal(head["lm_head.weight"], embedding)
    else:
        assert not torch.equal(head["lm_head.weight"], embedding)
        want = hf_state_dict(folder)["lm_head.weight"]
        assert torch.equal(head["lm_head.weight"], want)


def test_gguf_config_matches_hf_config(hf_source, gguf_store):
    folder, _, _ = hf_source
    want, got = AutoConfig.from_pretrained(folder), gguf_store.config()
    for key in CONFIG_KEYS:
        assert getattr(got, key, None) == getattr(want, key, None), key
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as f32
    assert got.rope_parameters["rope_theta"] == want.rope_parameters["rope_theta"]


def test_gguf_model_computes_what_hf_model_computes(hf_source, gguf_store):
    _, hf_store, _ = hf_source
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 12, 3]])
    with torch.no_grad():
        want = reference_model(hf_store)(ids).logits
        got = reference_model(gguf_store)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_gguf_tokenizer_and_chat_template_survive(hf_source, gguf_store):
    folder, _, _ = hf_source
    assert gguf_store.manifest.has_tokenizer
    want = AutoTokenizer.from_pretrained(folder)
    got = AutoTokenizer.from_pretrained(gguf_store.root)
    assert len(got) == len(want) == gguf_store.manifest.vocab_size
    for sentence in SENTENCES:
        ids = want(sentence)["input_ids"]
        assert got(sentence)["input_ids"] == ids, sentence
        assert got.decode(ids) == want.decode(ids) == sentence
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(got, attribute) == getattr(want, attribute), attribute
    assert got.chat_template == CHATML
    rendered = want.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert got.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        rendered
    )
    assert rendered.endswith("<|im_start|>assistant\n")


# --- GGUFs that must be refused -------------------------------------------------------------


def _import_with_deadline(path: Path, model_id: str, models_root: Path, **kwargs) -> Exception:
    """The exception ``import_model`` raises; fails the test if it returns or runs too long."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            import_model(path, model_id, models_root, **kwargs)
            outcome.append(None)
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(IMPORT_TIMEOUT_S)
    assert not worker.is_alive(), f"importing {path.name} hung for {IMPORT_TIMEOUT_S} s"
    assert outcome[0] is not None, f"importing {path.name} succeeded"
    return outcome[0]


def _assert_nothing_left(models_root: Path, model_id: str) -> None:
    assert not (models_root / model_id).exists()
    assert not (models_root / f".{model_id}.partial").exists()


@pytest.mark.parametrize("architecture", ["gpt2", "falcon", "phi3", "mamba"])
def test_architecture_outside_the_catalog_is_refused(hf_source, architecture):
    assert architecture not in CATALOG
    folder, _, models_root = hf_source
    path = write_llama_gguf(
        folder, folder.parent / f"{architecture}.gguf", architecture=architecture
    )
    error = _import_with_deadline(path, f"bad-{architecture}", models_root)
    assert isinstance(error, UnsupportedArchitecture), repr(error)
    assert f"architecture {architecture!r} is not in the catalog" in str(error)
    assert "llama" in str(error)  # lists what is supported
    _assert_nothing_left(models_root, f"bad-{architecture}")


def test_architecture_unknown_to_transformers_is_refused(hf_source):
    folder, _, models_root = hf_source
    path = write_llama_gguf(folder, folder.parent / "bogus.gguf", architecture="bogus")
    error = _import_with_deadline(path, "bad-bogus", models_root)
    assert isinstance(error, (ModelError, ValueError)), repr(error)
    assert "bogus" in str(error) and "not supported" in str(error)
    _assert_nothing_left(models_root, "bad-bogus")


def _truncated(folder: Path, cut: str) -> Path:
    whole = write_llama_gguf(folder, folder.parent / "whole.gguf").read_bytes()
    keep = {
        "empty": 0,
        "magic": 3,
        "header": 100,
        "metadata": 2000,
        "half": len(whole) // 2,
        "last-byte": len(whole) - 1,
    }[cut]
    path = folder.parent / f"cut-{cut}.gguf"
    path.write_bytes(whole[:keep])
    return path


CUTS = ["empty", "magic", "header", "metadata", "half", "last-byte"]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_gguf_fails_and_leaves_nothing(hf_source, cut):
    folder, _, models_root = hf_source
    path = _truncated(folder, cut)
    _import_with_deadline(path, f"cut-{cut}", models_root)
    _assert_nothing_left(models_root, f"cut-{cut}")


def test_failed_reimport_keeps_the_existing_model(hf_source):
    folder, _, models_root = hf_source
    path = write_llama_gguf(folder, folder.parent / "keep.gguf")
    before = import_model(path, "keep-me", models_root)
    sha = {name: entry.sha256 for name, entry in before.manifest.blocks.items()}
    _import_with_deadline(_truncated(folder, "half"), "keep-me", models_root, overwrite=True)
    after = BlockStore(models_root / "keep-me")
    assert {name: entry.sha256 for name, entry in after.manifest.blocks.items()} == sha
    assert after.verify() == []
    assert not (models_root / ".keep-me.partial").exists()


@pytest.mark.parametrize("cut", ["header", "half"])
def test_unreadable_gguf_is_a_store_error(hf_source, cut):
    folder, _, models_root = hf_source
    path = _truncated(folder, cut)
    error = _import_with_deadline(path, f"clean-{cut}", models_root)
    assert isinstance(error, StoreError), repr(error)
    assert path.name in str(error)
