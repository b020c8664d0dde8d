"""Decode and prompt speed of the 3-span block engine on SmolLM2, per weight format, against
our own fp32 path, ``transformers`` and llama.cpp in the same run.

    python bench/engine.py [--threads 2] [--decode 64] [--prompt 64] [--repeats 3]
                           [--formats default,int8,int4,bf16]

The GGUF is imported once per format: ``fp32`` (the reference path), ``default`` (the GGUF's own
weights: Q4_1 layers as int4, the Q8_0 embedding and head as int8), and each of ``--formats``.
llama.cpp (``llama-cpp-python``, the optional ``bench`` extra) runs the same GGUF file with the
same threads; its row says why when it cannot run. Greedy; the runs of all paths are
interleaved, so a busy machine slows them alike. Our engine's rates are the numbers
``tiktrue generate --stats`` prints (``GenerationResult``): prompt tok/s is the prompt's tokens
over the time to the first token, decode tok/s the steps after it over their time. Results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from report import append
from tiktrue.model.demo_model import ensure_demo_model, fetch_demo_gguf
from tiktrue.model.engine import BlockEngine, split_evenly
from tiktrue.model.generation import GenerationResult, LocalChain, stream_tokens
from tiktrue.model.sampling import SamplingParams
from tiktrue.model.tokenizer import load_tokenizer


def engine_run(chain: LocalChain, prompt: list[int], steps: int, session: str, tokenizer):
    """Greedy answer of ``steps`` + 1 tokens through ``stream_tokens``, timed as
    ``tiktrue generate --stats`` times it: (prompt seconds, decode seconds, tokens)."""
    result = GenerationResult()
    params = SamplingParams(temperature=0, max_tokens=steps + 1)

    async def answer() -> None:
        async for _ in stream_tokens(
            chain,
            prompt,
            params,
            tokenizer=tokenizer,
            stop_ids=set(),
            session_id=session,
            result=result,
        ):
            pass

    chain.open(session)
    asyncio.run(answer())
    chain.close(session)
    return result.time_to_first_token, result.decode_seconds, result.token_ids


def perplexity(chain: LocalChain, ids: list[int], window: int = 512) -> float:
    """exp(mean negative log-likelihood) of ``ids``, in windows, through the span chain."""
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(ids) - 1, window)):
        chunk = torch.tensor(ids[start : start + window + 1])
        session = f"ppl{n}"
        chain.open(session)
        hidden = chunk[:-1]
        for engine in chain.engines[:-1]:
            hidden = engine.forward(session, hidden, 0)
        logits = chain.engines[-1].forward(session, hidden, 0, all_logits=True)[0]
        chain.close(session)
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def llama_cpp(gguf: Path, threads: int, context: int):
    """A llama.cpp model of ``gguf`` on ``threads`` threads, or the reason it cannot run."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return None, f"llama-cpp-python is not installed (pip install -e '.[bench]'): {exc}"
    # a build for another CPU (or with AMX the OS does not grant) dies of SIGILL at its first
    # step: try one in a child process first, so this bench reports it instead of dying
    probe = (
        "import sys; from llama_cpp import Llama; "
        "m = Llama(model_path=sys.argv[1], n_threads=1, n_ctx=32, verbose=False); m.eval([1, 2])"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(gguf)], capture_output=True)
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else done.stderr.decode()[-300:]
        return None, (
            f"llama-cpp-python fails on this CPU ({why}); rebuild it for this CPU, e.g. "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF '
            '-DGGML_AMX_INT8=OFF" pip install --force-reinstall --no-deps llama-cpp-python'
        )
    model = Llama(
        model_path=str(gguf),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=context,
        n_batch=context,
        verbose=False,
    )
    return model, ""


def llama_cpp_run(model, prompt: list[int], steps: int):
    """Prefill seconds, decode seconds and greedy tokens (argmax of llama.cpp's logits)."""
    model.reset()
    began = time.perf_counter()
    model.eval(prompt)
    prefill = time.perf_counter() - began
    tokens = [int(model.scores[model.n_tokens - 1].argmax())]
    began = time.perf_counter()
    for _ in range(steps):
        model.eval(tokens[-1:])
        tokens.append(int(model.scores[model.n_tokens - 1].argmax()))
    return prefill, time.perf_counter() - began, tokens


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
    parser.add_argument("--formats", default="default,int8,int4,bf16", help="besides fp32")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="of README.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    formats = ["fp32", *[f for f in args.formats.split(",") if f and f != "fp32"]]
    stores = {f: ensure_demo_model(dtype=None if f == "default" else f) for f in formats}
    chains, spans, load_s = {}, None, {}
    for fmt, store in stores.items():
        spans = split_evenly(store.manifest.model_chain_order, 3)
        began = time.perf_counter()
        chains[fmt] = LocalChain([BlockEngine(store, s) for s in spans])
        load_s[fmt] = time.perf_counter() - began
    reference = stores["fp32"]
    config = reference.config()
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(reference.load_full_state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    model.generation_config.pad_token_id = config.eos_token_id

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(
        100, config.vocab_size - 100, (args.prompt,), generator=generator
    ).tolist()

    llama, why_not = llama_cpp(fetch_demo_gguf(), args.threads, args.prompt + args.decode + 8)

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    text_ids = load_tokenizer(reference)(text)["input_ids"][: args.ppl_tokens]
    ppl = {fmt: perplexity(chain, text_ids) for fmt, chain in chains.items()}

    others = ["transformers", *(["llama.cpp"] if llama is not None else [])]
    runs: dict[str, list] = {f: [] for f in [*formats, *others]}
    tokenizer = load_tokenizer(reference)
    for fmt, chain in chains.items():
        engine_run(chain, prompt, 4, f"warmup-{fmt}", tokenizer)
    transformers_run(model, prompt, 4)
    if llama is not None:
        llama_cpp_run(llama, prompt, 4)
    for r in range(args.repeats):  # interleaved
        for fmt, chain in chains.items():
            runs[fmt].append(engine_run(chain, prompt, args.decode, f"run{r}-{fmt}", tokenizer))
        runs["transformers"].append(transformers_run(model, prompt, args.decode))
        if llama is not None:
            runs["llama.cpp"].append(llama_cpp_run(llama, prompt, args.decode))

    def rates(results):  # the best run: on a shared machine other processes only add time
        prefill = max(args.prompt / r[0] for r in results)
        decode = max(args.decode / r[1] for r in results)
        return prefill, decode

    base_prefill, base_decode = rates(runs["fp32"])
    hf_tokens = runs["transformers"][0][2]
    lines = [
        f"SmolLM2-135M-Instruct from its Q4_1 GGUF, {args.threads} threads, 3 spans "
        + ", ".join(str(s) for s in spans)
        + f"; best of {args.repeats} interleaved runs; {args.decode} greedy decode steps",
        "",
        "| path | weights | store MB | load s | decode tok/s | × fp32 | prompt tok/s | × fp32 "
        f"| greedy tokens = transformers fp32 | perplexity, README.md ({len(text_ids)} tokens) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in runs:
        prefill, decode = rates(runs[name])
        if name == "transformers":
            label, weights, size, load, quality = "transformers generate", "fp32", "", "", ""
        elif name == "llama.cpp":
            label, weights, load, quality = "llama.cpp, the same GGUF", "Q4_1+Q8_0", "", ""
            size = f"{fetch_demo_gguf().stat().st_size / 1e6:.0f}"
        else:
            store = stores[name]
            label, weights = f"TikTrue engine ({name})", store.weight_format
            size, load = f"{store.manifest.total_bytes / 1e6:.0f}", f"{load_s[name]:.1f}"
            quality = f"{ppl[name]:.3f} (× {ppl[name] / ppl['fp32']:.3f})"
        same = runs[name][0][2] == hf_tokens
        lines.append(
            f"| {label} | {weights} | {size} | {load} | {decode:.1f} | {decode / base_decode:.2f} "
            f"| {prefill:.0f} | {prefill / base_prefill:.2f} | {same} | {quality} |"
        )
    if llama is None:
        lines += ["", f"llama.cpp: not run ({why_not})."]
    elif "default" in runs:
        same = runs["llama.cpp"][0][2] == runs["default"][0][2]
        lines += ["", f"Greedy tokens of llama.cpp = TikTrue engine (default): {same}."]
    print("\n".join(lines))
    if not args.no_record:
        append("Block engine per weight format vs fp32 and transformers (bench/engine.py)", lines)


if __name__ == "__main__":
    main()
