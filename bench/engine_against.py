"""The block engine of this checkout against the engine of an earlier commit, in one process,
interleaved (a busy machine slows both alike): decode tok/s at 100 and 2,000 positions of
context, 8 sessions decoding as one batch, and a 64-token prompt, on the demo model's default
weights, the whole model in one span.

    python bench/engine_against.py --ref COMMIT [--threads 2] [--steps 32] [--rounds 3] [--cpu]

The earlier engine is read from git (``git archive REF src/tiktrue``) into a temporary package.
``--cpu`` measures the process's CPU time instead of wall time (steadier on a shared machine,
with one thread). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from report import append
from tiktrue.model import engine as this_engine
from tiktrue.model.demo_model import ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]


def engine_at(ref: str):
    """``tiktrue.model.engine`` as it was at ``ref`` (as package ``tiktrue_ref``)."""
    where = Path(tempfile.mkdtemp(prefix="tiktrue-ref-"))
    archive = ["git", "-C", str(ROOT), "archive", ref, "src/tiktrue"]
    data = subprocess.run(archive, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(where, filter="data")
    package = (where / "src" / "tiktrue").rename(where / "tiktrue_ref")
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\btiktrue\b(?=[. ])", "tiktrue_ref", path.read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module("tiktrue_ref.model.engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contexts", default="100,2000")
    parser.add_argument("--cpu", action="store_true", help="process CPU time, not wall time")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu else time.perf_counter
    store = ensure_demo_model()
    blocks = tuple(store.manifest.model_chain_order)
    earlier = engine_at(args.ref)
    engines = {
        args.ref: earlier.BlockEngine(store, earlier.Span(blocks), kv_budget_bytes=512 << 20),
        "this": this_engine.BlockEngine(store, this_engine.Span(blocks), kv_budget_bytes=512 << 20),
    }
    generator = torch.Generator().manual_seed(0)
    token = torch.tensor([7])

    def ids(n: int) -> torch.Tensor:
        return torch.randint(100, 40000, (n,), generator=generator)

    def decode(engine, context: int, sid: str) -> float:
        engine.open_session(sid)
        prompt = ids(context)
        for at in range(0, context, 256):
            engine.forward(sid, prompt[at : at + 256], at)
        for at in range(context, context + 3):  # warm
            engine.forward(sid, token, at)
        began = clock()
        for at in range(context + 3, context + 3 + args.steps):
            engine.forward(sid, token, at)
        seconds = clock() - began
        engine.close_session(sid)
        return args.steps / seconds

    def batch(engine, sid: str) -> float:
        sids = [f"{sid}-{i}" for i in range(8)]
        starts = [60 + 10 * i for i in range(8)]
        for s, n in zip(sids, starts, strict=True):
            engine.open_session(s)
            engine.forward(s, ids(n), 0)
        for i in range(3 + args.steps):
            if i == 3:
                began = clock()
            engine.forward_batch([(s, token, n + i) for s, n in zip(sids, starts, strict=True)])
        seconds = clock() - began
        for s in sids:
            engine.close_session(s)
        return 8 * args.steps / seconds

    def prompt(engine, sid: str) -> float:
        engine.open_session(sid)
        began = clock()
        engine.forward(sid, ids(64), 0)
        seconds = clock() - began
        engine.close_session(sid)
        return 64 / seconds

    contexts = [int(c) for c in args.contexts.split(",")]
    kinds = [f"decode at {c} positions" for c in contexts]
    kinds += ["8 sessions, one batch (tokens of all)", "64-token prompt"]
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, engine in engines.items():
            got = [decode(engine, c, f"{name}{r}d{c}") for c in contexts]
            got += [batch(engine, f"{name}{r}b"), prompt(engine, f"{name}{r}p")]
            for kind, rate in zip(kinds, got, strict=True):
                rates.setdefault((name, kind), []).append(rate)
            print(name, [f"{g:.1f}" for g in got], flush=True)
    lines = [
        f"SmolLM2-135M-Instruct, default weights, one span, {args.threads} threads, "
        f"{'process CPU' if args.cpu else 'wall'} time, {args.steps} steps, {args.rounds} "
        f"interleaved rounds; this checkout against {args.ref}",
        "",
        f"| tok/s | {args.ref} best | median | this best | median | × best | × median |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        before, now = rates[(args.ref, kind)], rates[("this", kind)]
        b, n = (max(before), statistics.median(before)), (max(now), statistics.median(now))
        lines.append(
            f"| {kind} | {b[0]:.1f} | {b[1]:.1f} | {n[0]:.1f} | {n[1]:.1f} "
            f"| {n[0] / b[0]:.2f} | {n[1] / b[1]:.2f} |"
        )
    print("\n".join(lines))
    if not args.no_record:
        append(f"Block engine against {args.ref} (bench/engine_against.py)", lines)


if __name__ == "__main__":
    main()
