"""SessionPagedKVCache on its own: pages, LRU spill, save/load, truncate."""

from __future__ import annotations

import pytest
import torch

from tiktrue.model.errors import (
    CacheBudgetExceeded,
    PositionError,
    SessionExists,
    ShapeError,
    UnknownSession,
)
from tiktrue.model.kv_cache import SessionPagedKVCache

LAYERS, HEADS, DIM, PAGE = [4, 5], 2, 8, 4
PAGE_BYTES = len(LAYERS) * 2 * HEADS * PAGE * DIM * 4


def make(pages: int, tmp_path, dtype=torch.float32) -> SessionPagedKVCache:
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = pages * PAGE_BYTES // 4 * itemsize
    return SessionPagedKVCache(
        LAYERS, HEADS, DIM, dtype=dtype, budget_bytes=budget, page_size=PAGE, spill_dir=tmp_path
    )


def write(cache, session, start, count, seed, dtype=torch.float32):
    """One forward step: every layer stores ``count`` new keys/values; returns them all."""
    gen = torch.Generator().manual_seed(seed)
    plan = cache.plan([cache.begin(session, start, count)])
    for local in range(len(LAYERS)):
        k = torch.randn(count, HEADS, DIM, generator=gen).to(dtype)
        v = torch.randn(count, HEADS, DIM, generator=gen).to(dtype)
        cache.write(local, plan, k, v)
    cache.commit(plan)
    return {layer: cache.keys_values(session, layer) for layer in LAYERS}


def contents(cache, session):
    return {layer: tuple(t.clone() for t in cache.keys_values(session, layer)) for layer in LAYERS}


def test_keys_accumulate_across_steps_and_pages(tmp_path):
    cache = make(8, tmp_path)
    cache.open("s")
    first = write(cache, "s", 0, 6, seed=1)  # crosses a page boundary
    second = write(cache, "s", 6, 1, seed=2)
    k_all, v_all = second[4]
    assert k_all.shape == (1, HEADS, 7, DIM)
    assert torch.equal(k_all[:, :, :6], first[4][0])
    assert cache.length("s") == 7
    assert cache.stats().pages_free == 8 - 2


def test_lru_session_is_spilled_and_restored_exactly(tmp_path):
    cache = make(4, tmp_path)
    for s in ("a", "b"):
        cache.open(s)
        write(cache, s, 0, 8, seed=ord(s))  # 2 pages each: the pool is full
    before = {s: contents(cache, s) for s in ("b", "a")}  # "a" is now the most recent
    cache.open("c")
    write(cache, "c", 0, 4, seed=3)  # needs a page: the least recently used, "b", goes to disk
    assert cache.stats().sessions_spilled == 1
    assert cache.length("b") == 8  # known while on disk
    assert list(tmp_path.glob("*.npz"))
    back = contents(cache, "b")  # brings "b" back; "a" (now least recent) goes to disk
    assert cache.stats().sessions_spilled == 1 and cache.length("a") == 8
    assert all(torch.equal(before["b"][n][i], back[n][i]) for n in LAYERS for i in (0, 1))
    again = contents(cache, "a")
    assert all(torch.equal(before["a"][n][i], again[n][i]) for n in LAYERS for i in (0, 1))


def test_one_session_larger_than_the_pool_is_refused(tmp_path):
    cache = make(2, tmp_path)
    cache.open("s")
    with pytest.raises(CacheBudgetExceeded):
        write(cache, "s", 0, 9, seed=0)
    assert cache.length("s") == 0 and cache.stats().pages_free == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_and_load_round_trip(tmp_path, dtype):
    cache = make(8, tmp_path, dtype)
    cache.open("s")
    write(cache, "s", 0, 7, seed=5, dtype=dtype)
    saved = contents(cache, "s")
    path = cache.save_to_disk("s", tmp_path / "saved.npz")
    fresh = make(8, tmp_path, dtype)
    fresh.load_from_disk("restored", path)
    assert fresh.length("restored") == 7
    loaded = contents(fresh, "restored")
    assert all(torch.equal(saved[n][1], loaded[n][1]) for n in LAYERS)


def test_load_refuses_other_layers_dtype_and_garbage(tmp_path):
    cache = make(8, tmp_path)
    cache.open("s")
    write(cache, "s", 0, 3, seed=5)
    path = cache.save_to_disk("s", tmp_path / "saved.npz")
    other_layers = SessionPagedKVCache([6, 7], HEADS, DIM, page_size=PAGE, spill_dir=tmp_path)
    with pytest.raises(ShapeError, match="holds layers"):
        other_layers.load_from_disk("s", path)
    halfs = make(8, tmp_path, torch.float16)
    with pytest.raises(ShapeError, match="float32"):
        halfs.load_from_disk("s", path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ShapeError, match="not a saved KV cache"):
        cache.load_from_disk("t", tmp_path / "junk.npz")
    with pytest.raises(SessionExists):
        cache.load_from_disk("s", path)
    assert not cache.has("t")


def test_errors_for_unknown_sessions_positions_and_truncation(tmp_path):
    cache = make(8, tmp_path)
    with pytest.raises(UnknownSession):
        cache.begin("x", 0, 1)
    with pytest.raises(UnknownSession):
        cache.close("x")
    cache.open("s")
    write(cache, "s", 0, 5, seed=1)
    with pytest.raises(PositionError, match="must start at 5"):
        cache.begin("s", 4, 1)
    with pytest.raises(PositionError, match="cannot truncate to 6"):
        cache.truncate("s", 6)
    cache.truncate("s", 3)
    assert cache.length("s") == 3 and cache.stats().pages_free == 7
    cache.close("s")
    assert cache.stats().pages_free == 8 and not cache.has("s")
