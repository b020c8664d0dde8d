"""Attention over the paged KV cache, one query row at a time, read where the keys lie.

Why not ``torch.nn.functional.scaled_dot_product_attention``: its CPU kernels split queries and
keys into blocks whose sizes depend on how many rows and keys a call holds, and reduce each
block with vectorized sums and matrix products whose association follows those blocks. A
session's logits then changed with the sessions that shared its batch and with how its prompt
was chunked (on the demo model 0/48 decode rows of an 8-session batch equalled the same step
alone): a greedy answer among other chats, or after a replay on a new PC, was another answer.
It also wanted each session's keys as one tensor: the cache copied every page of every layer
on every step (``index_select``), which slowed a conversation from 32.5 to 17.7 tokens/s by
2,000 tokens.

Here every query row (a session's position ``p``) attends to its own keys ``0..p`` (or its
sliding window) with arithmetic that depends on nothing but that row: the keys are read from
the row's session's pages in place, the dot products run over ``head_dim`` in one fixed loop,
the softmax and the weighted sum of values run over the row's own keys in position order.
Which other rows share the call, how many there are and which thread takes a row change
nothing in it, so decode alone, decode among 7 other sessions and a prefill of any chunking
give bit-identical outputs. Compiled by numba (LLVM, from wheels on Windows and Linux, no
compiler needed).

Not numba's thread pool: beside torch's OpenMP pool it made every op of a step wait for the
other pool's spinning threads (an int4 matmul took 12 ms instead of 0.2 on a loaded 2-core
machine). A call with many keys takes one helper thread of ours instead (the kernel releases
the GIL); a decode step over 100 positions stays on the caller's thread (about 0.7 ms for
SmolLM2's 30 layers).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Vectorized sums may be reassociated at compile time: the order then is fixed by the loop and
# its length (a row's own), never by what else runs. No nnan/ninf: a NaN stays visible.
_FASTMATH = {"reassoc", "nsz", "arcp", "contract"}


@intrinsic
def _widen(typingctx, x):
    """A stored key or value as float32: bf16 bits (uint16), fp16 bits (int16) or float32."""
    if x == types.uint16:

        def codegen(context, builder, sig, args):
            wide = builder.zext(args[0], ir.IntType(32))
            shifted = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(shifted, ir.FloatType())

    elif x == types.int16:

        def codegen(context, builder, sig, args):
            half = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(half, ir.FloatType())

    elif x == types.float32:

        def codegen(context, builder, sig, args):
            return args[0]

    else:
        return None
    return types.float32(x), codegen


@intrinsic
def _float_from_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(nogil=True, cache=True)
def _exp_nonpositive(v):
    """``e**v`` for ``v <= 0`` within 2 ulp (Cephes' expf), one formula for every element
    (libm's ``exp`` would run scalar in a loop that is otherwise vectorized). Strict IEEE
    arithmetic: compiled apart from the kernel's reassociating loops."""
    v = max(v, np.float32(-87.0))
    k = np.floor(v * np.float32(1.44269504) + np.float32(0.5))
    x = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * x + np.float32(1.3981999507e-3)
    p = p * x + np.float32(8.3334519073e-3)
    p = p * x + np.float32(4.1665795894e-2)
    p = p * x + np.float32(1.6666665459e-1)
    p = p * x + np.float32(5.0000001201e-1)
    scale = _float_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
    return (p * x * x + x + np.float32(1.0)) * scale


@numba.njit(nogil=True, cache=True)
def _softmax_weights(scores, count):
    """``scores[:count]`` -> ``exp(scores - max)`` in place; returns their sum (in order)."""
    top = scores[0]
    for j in range(1, count):
        top = max(top, scores[j])
    total = np.float32(0.0)
    for j in range(count):
        e = _exp_nonpositive(scores[j] - top)
        scores[j] = e
        total += e
    return total


@numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _attend(
    q, pool, kv_heads, pages, layer, row_table, tables, lengths, window, scale, first, last, out
):
    """``out[r] = softmax(q[r] . K^T * scale) V`` over row ``r``'s keys, for every row.

    q: [rows, heads, dim] float32; pool: [layers * 2 * kv_heads * pages, page, dim] (the
    cache's pool; bf16 as uint16, fp16 as int16, or float32); tables: [steps, most pages] page
    tables, ``row_table``: [rows] which one each row reads; lengths: [rows] keys each row sees
    (position + 1); window: 0 or the sliding window; units ``first..last-1`` of (row, kv
    head) only. Keys and values are widened to float32 as they are read; nothing is copied.
    """
    heads, dim = q.shape[1], q.shape[2]
    page = pool.shape[1]
    group = heads // kv_heads
    queries = np.empty((group, dim), np.float32)
    summed = np.empty((group, dim), np.float32)
    weights = np.empty((group, lengths.max()), np.float32)
    for unit in range(first, last):
        r = unit // kv_heads
        g = unit % kv_heads
        table = tables[row_table[r]]
        end = lengths[r]
        start = max(end - window, 0) if window > 0 else 0
        count = end - start
        keys_base = ((layer * 2) * kv_heads + g) * pages
        values_base = ((layer * 2 + 1) * kv_heads + g) * pages
        for h in range(group):
            for d in range(dim):
                queries[h, d] = q[r, g * group + h, d] * scale
        for j in range(count):
            at = start + j
            key = pool[keys_base + table[at // page], at % page]
            for h in range(group):
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += queries[h, d] * _widen(key[d])
                weights[h, j] = acc
        totals = np.empty(group, np.float32)
        for h in range(group):
            totals[h] = _softmax_weights(weights[h], count)
        summed[:, :] = 0.0
        for j in range(count):
            at = start + j
            value = pool[values_base + table[at // page], at % page]
            for h in range(group):
                w = weights[h, j]
                for d in range(dim):
                    summed[h, d] += w * _widen(value[d])
        for h in range(group):
            inverse = np.float32(1.0) / totals[h]
            for d in range(dim):
                out[r, g * group + h, d] = summed[h, d] * inverse


def pool_view(pool: torch.Tensor) -> np.ndarray:
    """The cache's pool ``[layers, 2, kv_heads, pages, page, dim]`` as the kernel reads it
    (the same memory): ``[layers * 2 * kv_heads * pages, page, dim]``."""
    flat = pool.reshape(-1, pool.shape[-2], pool.shape[-1])
    if pool.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if pool.dtype == torch.float16:
        return flat.view(torch.int16).numpy()
    if pool.dtype == torch.float32:
        return flat.numpy()
    raise TypeError(f"no attention kernel for a {pool.dtype} KV cache")


def attend(
    query: torch.Tensor,
    pool: np.ndarray,
    *,
    kv_heads: int,
    pages: int,
    layer: int,
    plan,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` ([rows, heads, dim]) over the cache, float32 [rows, heads, dim].

    ``pool``: ``pool_view`` of the cache; ``layer``: the cache's own layer index; ``plan``:
    the step's rows (``RowPlan`` of the cache: page tables, lengths)."""
    q = query.float().contiguous().numpy()
    out = np.empty_like(q)
    args = (q, pool, kv_heads, pages, layer, plan.row_table, plan.tables, plan.lengths)
    args += (window or 0, np.float32(scale))
    units = len(plan.lengths) * kv_heads
    keys = np.minimum(plan.lengths, window) if window else plan.lengths
    if torch.get_num_threads() < 2 or int(keys.sum()) * kv_heads < SPLIT_KEYS:
        _attend(*args, 0, units, out)
        return torch.from_numpy(out)
    # two threads, each a run of (row, kv head) units of about half the keys: the same
    # arithmetic per unit, so the split changes no bit
    work = np.cumsum(np.repeat(keys, kv_heads))
    middle = min(max(int(np.searchsorted(work, work[-1] / 2)), 1), units - 1)
    other = _helper().submit(_attend, *args, middle, units, out)
    _attend(*args, 0, middle, out)
    other.result()
    return torch.from_numpy(out)


SPLIT_KEYS = 2048  # (row, kv head, key) triples from which a call takes a second thread
_HELPER: list[ThreadPoolExecutor] = []


def _helper() -> ThreadPoolExecutor:
    """One thread beside the caller's (the kernel releases the GIL): numba's own thread pool
    made torch's OpenMP threads wait (see the module's docstring)."""
    if not _HELPER:
        _HELPER.append(ThreadPoolExecutor(1, thread_name_prefix="tiktrue-attention"))
    return _HELPER[0]


def warm_up(pool: np.ndarray, *, kv_heads: int, pages: int) -> None:
    """Compile the kernel for this cache's pool now, with one row over one key of the cache's
    first page (it writes nothing in the cache). Compiling takes seconds of CPU and holds the
    interpreter: at a span's first step it stalled the node's event loop (heartbeats, links)
    long enough for the admin to call a working PC dead mid-answer. numba keeps what it
    compiled on disk (``cache=True``), so the next load of this dtype takes milliseconds."""
    one = np.zeros(1, dtype=np.int64)
    q = np.zeros((1, kv_heads, pool.shape[-1]), dtype=np.float32)
    out = np.empty_like(q)
    table, length = one.reshape(1, 1), one + 1
    _attend(q, pool, kv_heads, pages, 0, one, table, length, 0, np.float32(1), 0, kv_heads, out)
