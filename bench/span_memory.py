"""Memory of a span: loading k of L layers should cost about k/L of the weights plus a constant.

    python bench/span_memory.py [--dtype fp32|bf16|int8|int4|gguf]

Each span is loaded in a fresh process; RSS is read before ``BlockEngine(...)``, after it
(``loaded``, once freed heap memory went back to the OS as the node service does) and after
its first forward pass of 8 tokens. Blocks are private, verified copies
(``model.store``: a file changed on disk never reaches a served weight); each span is measured
a second time the way blocks were loaded before, memory-mapped from the files (``mmap``), for
the cost of that guarantee, in the same run.
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
from tiktrue.node.memory import release_free_memory
dtype = None if sys.argv[4] == "gguf" else sys.argv[4]
store = ensure_demo_model(log=lambda *a: None, dtype=dtype)
if sys.argv[3] == "mmap":  # the loading before private copies, for comparison
    from safetensors.torch import load_file
    store.load_block = lambda name, verify=True: load_file(store.block_path(name))
order = store.manifest.model_chain_order
store.config()
before = psutil.Process().memory_info().rss
engine = BlockEngine(store, Span.of(order, sys.argv[1], sys.argv[2]))
release_free_memory()  # as the node service does once its spans are loaded
loaded = psutil.Process().memory_info().rss
engine.open_session("s")  # one forward pass touches every weight page
x = torch.arange(8) if engine.span.has_embed else torch.zeros(1, 8, engine.hidden_size)
engine.forward("s", x, 0)
after = psutil.Process().memory_info().rss
print(json.dumps({"rss_delta": after - before, "rss_loaded": loaded - before,
                  "weights": engine.weight_bytes, "layers": len(engine.layers)}))
"""


def measure(first: str, last: str, mode: str, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, first, last, mode, dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, int8, int4 or gguf")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    spans = [
        ("layer_0", "layer_2"),
        ("layer_0", "layer_14"),
        ("layer_0", "layer_29"),
        ("embed", "layer_9"),
        ("layer_21", "head"),
        ("embed", "head"),
    ]
    lines = [
        f"SmolLM2-135M-Instruct, weights {args.dtype} (30 layers); MB = 10^6 bytes; "
        "'copy': private verified copies (now), 'mmap': memory-mapped files (before)",
        "",
        "| span | layers | weights MB | RSS after load, copy / mmap | "
        "RSS after 8 tokens, copy / mmap | copy - mmap |",
        "|---|---|---|---|---|---|",
    ]
    for first, last in spans:
        copy, mmap = (measure(first, last, mode, args.dtype) for mode in ("copy", "mmap"))
        weights = copy["weights"] / 1e6
        loaded = f"{copy['rss_loaded'] / 1e6:.1f} / {mmap['rss_loaded'] / 1e6:.1f}"
        ran = f"{copy['rss_delta'] / 1e6:.1f} / {mmap['rss_delta'] / 1e6:.1f}"
        extra = (copy["rss_delta"] - mmap["rss_delta"]) / 1e6
        lines.append(
            f"| {first}..{last} | {copy['layers']} | {weights:.1f} | {loaded} | {ran} | "
            f"{extra:+.1f} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if not args.no_record:
        append("Span memory: private copies vs memory maps (bench/span_memory.py)", lines)


if __name__ == "__main__":
    main()
