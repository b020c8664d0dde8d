"""A worker receiving blocks: every chunk verified, nothing kept that does not verify."""

from __future__ import annotations

import pytest

from tiktrue.model.store import hash_chunks
from tiktrue.node.block_receiver import DiskCapExceeded, ReceiveError, held, receive_chunk


@pytest.fixture
def small_chunks(tiny_llama, tmp_path):
    """The tiny model's manifest with 4 KiB chunks, and an empty store to receive into."""
    manifest = tiny_llama.manifest.model_copy(deep=True)
    for entry in manifest.blocks.values():
        entry.chunk_size = 4096
        entry.sha256, entry.chunks = hash_chunks(tiny_llama.root / entry.file, 4096)
    return manifest, tiny_llama.root, tmp_path / "store"


def chunks_of(source, entry):
    data = (source / entry.file).read_bytes()
    return [data[i : i + entry.chunk_size] for i in range(0, len(data), entry.chunk_size)]


def test_a_block_arrives_chunk_by_chunk_and_appears_only_when_whole(small_chunks):
    manifest, source, root = small_chunks
    entry = manifest.blocks["layer_2"]
    pieces = chunks_of(source, entry)
    assert len(pieces) > 3
    for index, piece in enumerate(pieces[:-1]):
        assert receive_chunk(root, manifest, entry.file, index, piece, False) is False
        assert not (root / entry.file).exists()
    assert held(root, manifest)["partial"][entry.file] == len(pieces) - 1
    assert receive_chunk(root, manifest, entry.file, len(pieces) - 1, pieces[-1], True)
    assert (root / entry.file).read_bytes() == (source / entry.file).read_bytes()
    assert "layer_2" in held(root, manifest)["blocks"]


def test_bad_chunks_are_refused(small_chunks):
    manifest, source, root = small_chunks
    entry = manifest.blocks["layer_1"]
    pieces = chunks_of(source, entry)
    with pytest.raises(ReceiveError, match="does not match its sha256"):
        receive_chunk(root, manifest, entry.file, 0, b"x" + pieces[0][1:], False)
    receive_chunk(root, manifest, entry.file, 0, pieces[0], False)
    with pytest.raises(ReceiveError, match="before the chunks ahead"):
        receive_chunk(root, manifest, entry.file, 2, pieces[2], False)
    with pytest.raises(ReceiveError, match="not part of model"):
        receive_chunk(root, manifest, "blocks/../../etc.safetensors", 0, b"", True)
    with pytest.raises(ReceiveError, match="chunks, not"):
        receive_chunk(root, manifest, entry.file, 999, pieces[0], False)


def test_the_disk_cap_is_enforced(small_chunks):
    manifest, source, root = small_chunks
    entry = manifest.blocks["embed"]
    with pytest.raises(DiskCapExceeded, match="disk cap"):
        receive_chunk(
            root, manifest, entry.file, 0, chunks_of(source, entry)[0], False, disk_cap=1000
        )
    assert not (root / entry.file).exists()
