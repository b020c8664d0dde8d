"""Batch invariance (DESIGN.md §3): a session's logits are the same bits alone, among other
sessions of different lengths in one batch (decode steps and a prefill chunk mixed), and after
its KV cache was rebuilt by a prefill of its history in any chunking; its greedy tokens are
therefore the same. On the demo's real model with its default (int4/int8) weights, and on the
tiny models of every catalog architecture in each weight format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiktrue.model.engine import BlockEngine, Span, split_evenly
from tiktrue.model.importer import import_model

OTHER_LENGTHS = (3, 9, 17, 24, 40, 57, 70)  # the other 7 sessions of the batch


def run(engines, session, ids, start, *, all_logits=False) -> torch.Tensor:
    x = torch.as_tensor(ids)
    for engine in engines[:-1]:
        x = engine.forward(session, x, start)
    return engines[-1].forward(session, x, start, all_logits=all_logits)


def run_batch(engines, steps) -> list[torch.Tensor]:
    """``steps``: (session, token ids, start) through every span as one batch per span."""
    xs = [torch.as_tensor(ids) for _, ids, _ in steps]
    for engine in engines:
        xs = engine.forward_batch(
            [(sid, x, start) for (sid, _, start), x in zip(steps, xs, strict=True)]
        )
        assert not any(isinstance(x, Exception) for x in xs), xs
    return xs


def open_all(engines, session) -> None:
    for engine in engines:
        engine.open_session(session)


def alone(engines, prompt, steps) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy: the prompt as one step, then ``steps`` decode steps. (tokens, logits per step)"""
    open_all(engines, "alone")
    logits = [run(engines, "alone", prompt, 0)[0]]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(run(engines, "alone", [tokens[-1]], len(prompt) + i)[0])
    return tokens, logits


def among_others(engines, prompt, steps, vocab) -> tuple[list[int], list[torch.Tensor]]:
    """The same session among 7 others of different lengths: its prompt runs as a prefill
    chunk in a batch of the others' decode steps, then every decode step is one batch."""
    generator = torch.Generator().manual_seed(1)
    others = {}
    for n, length in enumerate(OTHER_LENGTHS):
        sid = f"other{n}"
        ids = torch.randint(vocab, (length,), generator=generator).tolist()
        open_all(engines, sid)
        others[sid] = [*ids, int(run(engines, sid, ids, 0)[0].argmax())]
    open_all(engines, "batched")
    tokens, logits = [], []
    for i in range(steps + 1):
        mine = ("batched", prompt, 0) if i == 0 else ("batched", [tokens[-1]], len(prompt) + i - 1)
        theirs = [(sid, ids[-1:], len(ids) - 1) for sid, ids in others.items()]
        out = run_batch(engines, [*theirs[:3], mine, *theirs[3:]])  # not first, not last
        logits.append(out[3][0])
        tokens.append(int(logits[-1].argmax()))
        for ids, x in zip(others.values(), [*out[:3], *out[4:]], strict=True):
            ids.append(int(x[0].argmax()))
    return tokens[:-1], logits


def replayed(engines, history, chunks, session) -> torch.Tensor:
    """The logits of every position of ``history``, prefilled in pieces of ``chunks``."""
    open_all(engines, session)
    out, at = [], 0
    for size in chunks:
        out.append(run(engines, session, history[at : at + size], at, all_logits=True)[0])
        at += size
    assert at == len(history)
    return torch.cat(out)


def assert_invariant(engines, prompt, steps, chunkings) -> None:
    vocab = engines[0].vocab_size
    tokens, logits = alone(engines, prompt, steps)
    batch_tokens, batch_logits = among_others(engines, prompt, steps, vocab)
    for i, (a, b) in enumerate(zip(logits, batch_logits, strict=True)):
        assert torch.equal(a, b), f"step {i}: in a batch, max |diff| {(a - b).abs().max()}"
    assert batch_tokens == tokens
    history = [*prompt, *tokens[:-1]]
    for n, chunks in enumerate(chunkings):
        rebuilt = replayed(engines, history, chunks, f"replay{n}")
        for i, expected in enumerate(logits[:-1]):
            got = rebuilt[len(prompt) - 1 + i]
            assert torch.equal(got, expected), f"chunks {chunks[:4]}...: step {i} differs"
        following = run(engines, f"replay{n}", tokens[-1:], len(history))[0]
        assert torch.equal(following, logits[-1]), f"chunks {chunks[:4]}...: next step differs"


def chunked(total: int, size: int, first: int = 0) -> list[int]:
    """``first`` (if any) then pieces of ``size``, covering ``total`` positions."""
    pieces = [first] if first else []
    left = total - first
    pieces += [size] * (left // size) + ([left % size] if left % size else [])
    return pieces


def test_demo_model_logits_alone_batched_and_replayed_are_identical(demo_store):
    """The demo's default weights on two spans: a 90-token prompt and 4 greedy steps; the
    history rebuilt whole, in pieces of 64 and of 7, and one by one from position 60."""
    order = demo_store.manifest.model_chain_order
    engines = [BlockEngine(demo_store, span) for span in split_evenly(order, 2)]
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, engines[0].vocab_size, (90,), generator=generator).tolist()
    steps = 4
    total = len(prompt) + steps - 1
    chunkings = [[total], chunked(total, 64), chunked(total, 7), chunked(total, 1, first=60)]
    assert_invariant(engines, prompt, steps, chunkings)


PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 12, 3, 77, 8, 1, 2, 3, 4, 5, 6, 7, 8]


def three_spans(store) -> list[BlockEngine]:
    order = store.manifest.model_chain_order  # embed, layer_0..layer_5, head
    return [
        BlockEngine(store, Span.of(order, "embed", "layer_1")),
        BlockEngine(store, Span.of(order, "layer_2", "layer_3")),
        BlockEngine(store, Span.of(order, "layer_4", "head")),
    ]


@pytest.mark.parametrize(
    ("architecture", "options"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("gemma", {}),
        ("mistral", {"sliding_window": 8}),  # the window moves through the prompt
    ],
)
def test_tiny_models_logits_alone_batched_and_replayed_are_identical(
    tiny_store_factory, architecture, options
):
    store = tiny_store_factory(architecture, **options)
    prompt = PROMPT * 3
    total = len(prompt) + 8 - 1
    chunkings = [[total], chunked(total, 1), chunked(total, 7), chunked(total, 32, first=5)]
    assert_invariant(three_spans(store), prompt, 8, chunkings)


@pytest.fixture(scope="module")
def tiny_formats(tmp_path_factory):
    """``store(fmt)``: one tiny Llama imported as int8, int4 or bf16."""
    from tests.helpers.tiny_models import make_tiny_model

    base = tmp_path_factory.mktemp("formats")
    folder = make_tiny_model(base / "hf", "llama", seed=3)
    made = {}

    def store(fmt: str):
        if fmt not in made:
            made[fmt] = import_model(folder, f"tiny-{fmt}", base / "models", dtype=fmt)
        return made[fmt]

    return store


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
def test_every_weight_format_is_invariant(tiny_formats, fmt):
    prompt = PROMPT * 2
    total = len(prompt) + 6 - 1
    assert_invariant(three_spans(tiny_formats(fmt)), prompt, 6, [chunked(total, 1)])


OTHER_KERNELS = {"AVX512": "avx2", "AVX2": "avx512"}  # this CPU's torch kernels -> the others


def test_the_same_holds_with_the_other_cpu_kernels():
    """The checks above again in a child process on the other vector kernels of torch (AVX2
    on an AVX-512 machine, AVX-512 on an AVX2 one where the CPU has it), numba compiling for
    that CPU as well: CI on either kind of machine proves both."""
    here = torch.backends.cpu.get_cpu_capability()
    other = OTHER_KERNELS.get(here)
    if other is None:
        pytest.skip(f"torch runs its {here} kernels here: no other vector kernels to try")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": other}
    if other == "avx2":
        env["NUMBA_CPU_NAME"] = "haswell"  # an AVX2-only CPU's code, not this one's AVX-512
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    got = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if got == here:
        pytest.skip(f"this CPU has no {other} kernels for torch to take")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
        + ["-k", "not other_cpu_kernels"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"with {got} kernels:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
    assert " passed" in done.stdout


WARM_PROBE = """
import sys, torch
from tiktrue.model import attention
from tiktrue.model.engine import BlockEngine, Span
from tiktrue.model.store import BlockStore
store = BlockStore(sys.argv[1])
engine = BlockEngine(store, Span.of(store.manifest.model_chain_order, "embed", "head"))
loaded = list(attention._attend.signatures)
engine.open_session("s")
engine.forward("s", torch.tensor([1, 2, 3]), 0)
engine.forward_batch([("s", torch.tensor([4]), 3)])
print(len(loaded), len(attention._attend.signatures))
"""


def test_a_span_compiles_its_attention_kernel_when_it_loads(tiny_formats):
    """In a fresh process: loading a span compiles the kernel its cache needs, and its first
    steps compile nothing more (a compile at the first step held the interpreter for seconds
    while the node's heartbeats waited)."""
    store = tiny_formats("int8")
    done = subprocess.run(
        [sys.executable, "-c", WARM_PROBE, str(store.root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    loaded, after = map(int, done.stdout.split())
    assert loaded == 1 and after == 1, done.stdout
