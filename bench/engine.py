"""Decode and prompt speed of the 3-span block engine against ``transformers`` on SmolLM2.

    python bench/engine.py [--threads 2] [--decode 64] [--prompt 64] [--repeats 3]

Same weights (the imported block store, fp32), same threads, greedy. Decode tok/s excludes the
prompt; prompt tok/s is a 64-token prompt's forward pass. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from report import append
from tiktrue.model.demo_model import ensure_demo_model
from tiktrue.model.engine import BlockEngine, split_evenly
from tiktrue.model.generation import LocalChain


def engine_run(chain: LocalChain, prompt: list[int], steps: int, session: str):
    chain.open(session)
    began = time.perf_counter()
    logits = chain.forward(session, prompt, 0)
    prefill = time.perf_counter() - began
    tokens = [int(logits.argmax())]
    began = time.perf_counter()
    for i in range(steps):
        logits = chain.forward(session, [tokens[-1]], len(prompt) + i)
        tokens.append(int(logits.argmax()))
    decode = time.perf_counter() - began
    chain.close(session)
    return prefill, decode, tokens


def transformers_run(model, prompt: list[int], steps: int):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        began = time.perf_counter()
        model(ids, use_cache=True)
        prefill = time.perf_counter() - began
        # decode time = generate(1 + steps) - generate(1): generate's own prompt pass cancels out
        began = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        one = time.perf_counter() - began
        began = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False
        )
        full = time.perf_counter() - began
    return prefill, full - one, out[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    store = ensure_demo_model()
    spans = split_evenly(store.manifest.model_chain_order, 3)
    chain = LocalChain([BlockEngine(store, s) for s in spans])
    config = store.config()
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(store.load_full_state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    model.generation_config.pad_token_id = config.eos_token_id

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(
        100, config.vocab_size - 100, (args.prompt,), generator=generator
    ).tolist()

    engine_runs, hf_runs = [], []
    engine_run(chain, prompt, 4, "warmup")
    transformers_run(model, prompt, 4)
    for r in range(args.repeats):
        engine_runs.append(engine_run(chain, prompt, args.decode, f"run{r}"))
        hf_runs.append(transformers_run(model, prompt, args.decode))
    same = engine_runs[0][2] == hf_runs[0][2]

    def rates(runs):
        prefill = statistics.median(args.prompt / r[0] for r in runs)
        decode = statistics.median(args.decode / r[1] for r in runs)
        return prefill, decode

    e_prefill, e_decode = rates(engine_runs)
    h_prefill, h_decode = rates(hf_runs)
    lines = [
        f"SmolLM2-135M-Instruct fp32, {args.threads} threads, spans "
        + ", ".join(str(s) for s in spans)
        + f"; median of {args.repeats}; greedy tokens identical: {same}",
        "",
        "| | decode tok/s | 64-token prompt tok/s |",
        "|---|---|---|",
        f"| TikTrue 3-span engine | {e_decode:.1f} | {e_prefill:.0f} |",
        f"| transformers generate | {h_decode:.1f} | {h_prefill:.0f} |",
        f"| ratio engine / transformers | {e_decode / h_decode:.2f} "
        f"| {e_prefill / h_prefill:.2f} |",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("Block engine vs transformers (bench/engine.py)", lines)


if __name__ == "__main__":
    main()
