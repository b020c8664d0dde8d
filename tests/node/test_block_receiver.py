"""A worker receiving blocks: every chunk verified, nothing kept that does not verify."""

from __future__ import annotations

import pytest

from tiktrue.model.store import (
    MANIFEST,
    BlockStore,
    hash_chunks,
    seal_header,
    sealed_chunk_offset,
)
from tiktrue.node.block_receiver import DiskCapExceeded, ReceiveError, held, receive_chunk
from tiktrue.security.crypto_layer import BlockCipher, new_block_key


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


def keyring_of(key: bytes):
    return lambda network_id: BlockCipher(key) if network_id == "net-a" else None


def test_a_block_sealed_at_rest_never_touches_the_disk_in_the_clear(small_chunks):
    manifest, source, root = small_chunks
    keyring = keyring_of(new_block_key())
    entry = manifest.blocks["layer_2"]
    pieces = chunks_of(source, entry)
    sealed = dict(keyring=keyring, seal_for="net-a")
    for index, piece in enumerate(pieces[:2]):
        receive_chunk(root, manifest, entry.file, index, piece, False, **sealed)
    partial = root / (entry.file + ".sealed.partial")
    assert pieces[0][:64] not in partial.read_bytes()
    assert held(root, manifest, **sealed)["partial"][entry.file] == 2  # resumes after them
    for index in range(2, len(pieces)):
        receive_chunk(
            root, manifest, entry.file, index, pieces[index], index == len(pieces) - 1, **sealed
        )
    final = root / (entry.file + ".sealed")
    assert final.is_file() and not (root / entry.file).exists()
    assert pieces[1][:64] not in final.read_bytes()
    assert "layer_2" in held(root, manifest, keyring=keyring)["blocks"]

    (root / MANIFEST).write_text(manifest.model_dump_json())
    store = BlockStore(root, keyring=keyring)
    assert store.block_file("layer_2") == final and store.check_block("layer_2") is None
    assert store.read_block("layer_2") == (source / entry.file).read_bytes()
    assert "lacks" in BlockStore(root).check_block("layer_2")  # no key: never verified
    other = BlockStore(root, keyring=lambda network_id: BlockCipher(new_block_key()))
    assert "failed authentication" in other.check_block("layer_2")

    data = bytearray(final.read_bytes())  # two sealed chunks swapped: each opens, not there
    offset, size = sealed_chunk_offset(seal_header("net-a", 4096), 0, 4096), 4096 + 28
    data[offset : offset + size], data[offset + size : offset + 2 * size] = (
        data[offset + size : offset + 2 * size],
        data[offset : offset + size],
    )
    final.write_bytes(bytes(data))
    assert "failed authentication" in store.check_block("layer_2")
    final.write_bytes(bytes(data[: offset + size]))  # chunks cut off the end
    assert store.check_block("layer_2") is not None

    # the same block pushed in the clear replaces the sealed one
    for index, piece in enumerate(pieces):
        receive_chunk(root, manifest, entry.file, index, piece, index == len(pieces) - 1)
    assert not final.exists() and store.check_block("layer_2") is None
