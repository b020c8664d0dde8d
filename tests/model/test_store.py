"""Block store import (Hugging Face folders), manifest and verification."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tiny_models import make_tiny_model
from tiktrue.model.errors import CorruptBlock, StoreError, UnsupportedArchitecture
from tiktrue.model.importer import import_model
from tiktrue.model.store import BlockStore, hash_chunks, list_stores, sha256_file


def test_manifest_describes_every_block(tiny_llama):
    m = tiny_llama.manifest
    assert m.model_chain_order == ["embed", *(f"layer_{i}" for i in range(6)), "head"]
    assert m.architecture == "llama" and m.dtype == "fp32" and m.has_tokenizer
    for entry in m.blocks.values():
        path = tiny_llama.root / entry.file
        assert path.stat().st_size == entry.bytes
        assert sha256_file(path) == entry.sha256
        assert entry.parameters == sum(t.numel() for t in load_file(path).values())
        assert (entry.sha256, entry.chunks) == hash_chunks(path, entry.chunk_size)
    assert {"config.json", "tokenizer.json"} <= set(m.files)
    for name, item in m.files.items():
        assert sha256_file(tiny_llama.root / name) == item.sha256
    assert (tiny_llama.root / "config.json").is_file()
    assert (
        "chat_template" in (tiny_llama.root / "tokenizer_config.json").read_text()
        or (tiny_llama.root / "chat_template.jinja").is_file()
    )


def test_tied_embeddings_give_the_head_its_own_copy(tiny_llama):
    embed = tiny_llama.load_block("embed")["model.embed_tokens.weight"]
    head = tiny_llama.load_block("head")
    assert set(head) == {"model.norm.weight", "lm_head.weight"}
    assert torch.equal(head["lm_head.weight"], embed)


def test_sharded_untied_checkpoint_imports_to_the_same_blocks(tmp_path):
    source = make_tiny_model(
        tmp_path / "src", "qwen2", tie_word_embeddings=False, max_shard_size="40KB", seed=3
    )
    assert len(list(source.glob("*.safetensors"))) > 2  # really sharded
    store = import_model(source, "sharded", tmp_path / "models")
    weights = {}
    for shard in source.glob("*.safetensors"):
        weights.update(load_file(shard))
    imported = store.load_full_state_dict()
    assert imported.keys() == weights.keys()
    assert all(torch.equal(imported[k], weights[k]) for k in weights)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_import_converts_dtype(tmp_path, dtype):
    source = make_tiny_model(tmp_path / "src", "llama", num_layers=2)
    store = import_model(source, f"m-{dtype}", tmp_path / "models", dtype=dtype)
    assert store.manifest.dtype == dtype
    assert all(t.dtype == store.dtype for t in store.load_block("layer_1").values())


def test_import_refuses_bad_sources_and_leaves_nothing_behind(tmp_path):
    models = tmp_path / "models"
    with pytest.raises(StoreError, match="does not exist"):
        import_model(tmp_path / "nope", "x", models)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no config.json"):
        import_model(tmp_path / "empty", "x", models)
    source = make_tiny_model(tmp_path / "src", "llama", num_layers=2)
    with pytest.raises(StoreError, match="may only use"):
        import_model(source, "../escape", models)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "gpt2"
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        import_model(weird, "x", models)
    # a half-written shard: the import fails and no partial store remains
    for shard in source.glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(StoreError, match="cannot read"):
        import_model(source, "broken", models)
    assert sorted(p.name for p in models.iterdir()) == []


def test_existing_model_is_kept_unless_forced(tmp_path):
    source = make_tiny_model(tmp_path / "src", "llama", num_layers=2)
    models = tmp_path / "models"
    first = import_model(source, "m", models)
    with pytest.raises(StoreError, match="already exists"):
        import_model(source, "m", models)
    again = import_model(source, "m", models, overwrite=True)
    assert again.manifest.blocks == first.manifest.blocks


def test_verify_names_every_bad_block_and_list_shows_broken_stores(tmp_path):
    source = make_tiny_model(tmp_path / "src", "llama", num_layers=3)
    models = tmp_path / "models"
    store = import_model(source, "m", models)
    assert store.verify() == []
    store.block_path("layer_0").write_bytes(b"garbage")
    store.block_path("head").unlink()
    assert store.verify() == ["layer_0", "head"]
    (models / "bad").mkdir()
    (models / "bad" / "manifest.json").write_text("{not json")
    found = list_stores(models)
    assert [type(x) for x in found] == [StoreError, BlockStore]
    with pytest.raises(StoreError, match="no block store"):
        BlockStore(tmp_path)


@pytest.fixture
def store_copy(tiny_llama, tmp_path) -> BlockStore:
    """A copy of the tiny store that a test may damage."""
    return BlockStore(shutil.copytree(tiny_llama.root, tmp_path / "copy"))


def test_a_loaded_block_is_a_private_copy_of_what_was_verified(store_copy):
    """A write to the file after the load never reaches the tensors (no memory map)."""
    loaded = store_copy.load_block("layer_1")
    before = {name: tensor.clone() for name, tensor in loaded.items()}
    path = store_copy.block_path("layer_1")
    with path.open("r+b") as handle:  # in place: same inode, same size
        handle.seek(path.stat().st_size - 4096)
        handle.write(b"\x7f" * 4096)
    assert all(torch.equal(loaded[name], before[name]) for name in before)
    assert store_copy.check_block("layer_1") is not None


def test_verification_says_what_is_wrong(store_copy):
    path = store_copy.block_path("layer_0")
    data = path.read_bytes()
    assert store_copy.check_block("layer_0") is None
    path.write_bytes(data[:-1])
    with pytest.raises(CorruptBlock, match="layer_0") as caught:
        store_copy.load_block("layer_0")
    assert caught.value.reason == "wrong_size" and caught.value.code == "corrupt_block"
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "does not match its sha256" in store_copy.check_block("layer_0")
    path.unlink()
    assert "missing" in store_copy.check_block("layer_0")
    assert not store_copy.has_block("layer_0")
    assert store_copy.verify() == ["layer_0"]
