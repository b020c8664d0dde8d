"""The block guard: a span's damaged block file is reported, and so is its repair."""

from __future__ import annotations

import queue
import shutil

import pytest

from tiktrue.model.store import BlockStore
from tiktrue.node.block_guard import BlockGuard

CEILING_S = 120.0


@pytest.fixture
def store(tiny_llama, tmp_path) -> BlockStore:
    return BlockStore(shutil.copytree(tiny_llama.root, tmp_path / "copy"))


def watch(store: BlockStore, **options) -> tuple[BlockGuard, queue.Queue]:
    reports: queue.Queue = queue.Queue()
    guard = BlockGuard(store, ["layer_1", "layer_2"], reports.put, **options)
    return guard, reports


def flip_in_place(path) -> None:
    with path.open("r+b") as handle:
        handle.seek(-8, 2)
        byte = handle.read(1)[0]
        handle.seek(-8, 2)
        handle.write(bytes([byte ^ 1]))


def test_a_changed_file_is_reported_and_so_is_its_repair(store, tiny_llama):
    guard, reports = watch(store, poll_s=0.05)
    guard.start()
    try:
        flip_in_place(store.block_path("layer_2"))
        faults = reports.get(timeout=CEILING_S)
        assert list(faults) == ["layer_2"] and "sha256" in faults["layer_2"]
        store.block_path("layer_2").unlink()  # gone: still damaged, said so
        assert "missing" in reports.get(timeout=CEILING_S)["layer_2"]
        repaired = store.block_path("layer_2").with_suffix(".new")  # as a push lands it
        shutil.copyfile(tiny_llama.block_path("layer_2"), repaired)
        repaired.replace(store.block_path("layer_2"))
        assert reports.get(timeout=CEILING_S) == {}
    finally:
        guard.stop()


def test_the_periodic_recheck_finds_what_a_stat_does_not_show(store):
    """The file is damaged before the guard notes it (its size and times then match), as a
    write that puts the old mtime back would leave it: only the paced re-hash finds it."""
    flip_in_place(store.block_path("layer_1"))
    guard, reports = watch(store, poll_s=0.05, recheck_s=0.2, rate=1 << 20)
    guard.start()
    try:
        assert list(reports.get(timeout=CEILING_S)) == ["layer_1"]
    finally:
        guard.stop()


def test_a_span_that_did_not_load_hears_when_its_files_verify(store):
    """Started with the load's faults: every block is checked at once."""
    guard, reports = watch(store, poll_s=3600)
    guard.start({"layer_2": "does not match its sha256"})
    try:
        assert reports.get(timeout=CEILING_S) == {}  # the file was good by then
    finally:
        guard.stop()
