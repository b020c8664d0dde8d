"""Memory of a span: loading k of L layers should cost about k/L of the weights plus a constant.

    python bench/span_memory.py

Each span is loaded in a fresh process; RSS is read before ``BlockEngine(...)`` and after its
first forward pass of 8 tokens (block files are memory-mapped, so weights count once touched;
the KV pool is allocated but adds only the pages the 8 tokens use).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from report import append

CHILD = """
import json, sys, psutil, torch
from tiktrue.model.demo_model import ensure_demo_model
from tiktrue.model.engine import BlockEngine, Span
store = ensure_demo_model(log=lambda *a: None)
order = store.manifest.model_chain_order
store.config()
before = psutil.Process().memory_info().rss
engine = BlockEngine(store, Span.of(order, sys.argv[1], sys.argv[2]))
loaded = psutil.Process().memory_info().rss
engine.open_session("s")  # one forward pass touches every weight page
x = torch.arange(8) if engine.span.has_embed else torch.zeros(1, 8, engine.hidden_size)
engine.forward("s", x, 0)
after = psutil.Process().memory_info().rss
print(json.dumps({"rss_delta": after - before, "rss_loaded": loaded - before,
                  "weights": engine.weight_bytes, "layers": len(engine.layers)}))
"""


def measure(first: str, last: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, first, last], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    spans = [
        ("layer_0", "layer_2"),
        ("layer_0", "layer_6"),
        ("layer_0", "layer_14"),
        ("layer_0", "layer_29"),
        ("embed", "layer_9"),
        ("layer_21", "head"),
        ("embed", "head"),
    ]
    lines = [
        "SmolLM2-135M-Instruct fp32 (30 layers; each layer 14.2 MB, embed and head 113 MB each)",
        "",
        "| span | layers | span weights MB | RSS increase MB | increase - weights MB |",
        "|---|---|---|---|---|",
    ]
    for first, last in spans:
        m = measure(first, last)
        weights, delta = m["weights"] / 1e6, m["rss_delta"] / 1e6
        extra = delta - weights
        lines.append(
            f"| {first}..{last} | {m['layers']} | {weights:.1f} | {delta:.1f} | {extra:.1f} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "Layer spans cost their weights plus a constant of about 23 MB (the modules, rotary",
        "tables, the first KV page). Spans with `embed` cost less than their weights: the",
        "embedding matrix is memory-mapped and only the rows of tokens actually seen are read.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("Span memory (bench/span_memory.py)", lines)


if __name__ == "__main__":
    main()
