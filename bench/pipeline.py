"""Decode speed and time to first token through 3 node processes vs the one-process engine.

    python bench/pipeline.py [--decode 64] [--prompt 64] [--repeats 3] [--threads 2]

SmolLM2-135M-Instruct fp32, greedy, the same 3 spans. The network side runs three real
``tiktrue node`` processes on 127.0.0.1 with mutual TLS; this process drives the chain with the
gateway's own ``RemoteChain`` and token loop, so the figures are the chain's, without HTTP.
Per-hop latency is what each sender waited beyond the receiver's own time (network, TLS,
framing, queueing). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import torch

from report import append
from tiktrue.control.local_network import LocalCluster, prepare_local_network
from tiktrue.gateway.api_client import RemoteChain
from tiktrue.model.demo_model import ensure_demo_model
from tiktrue.model.engine import BlockEngine, split_evenly
from tiktrue.model.generation import GenerationResult, LocalChain, stream_tokens
from tiktrue.model.sampling import SamplingParams
from tiktrue.model.tokenizer import load_tokenizer
from tiktrue.security.node_tls import NetworkCredentials


async def run(chain, prompt, steps, tokenizer, session, timings=None):
    await chain.open(session) if asyncio.iscoroutinefunction(chain.open) else chain.open(session)
    result = GenerationResult()
    params = SamplingParams(temperature=0, max_tokens=steps + 1)
    stream = stream_tokens(
        chain,
        prompt,
        params,
        tokenizer=tokenizer,
        stop_ids=set(),
        session_id=session,
        result=result,
    )
    async for _ in stream:
        if timings is not None and chain.last_step is not None and chain.last_step.tokens == 1:
            timings.append(chain.last_step)
    await chain.close(session) if asyncio.iscoroutinefunction(chain.close) else chain.close(session)
    return result


async def measure(args, store, tokenizer, prompt, homes, config):
    remote = RemoteChain(config, NetworkCredentials.load(homes[0], config.network_id))
    spans = split_evenly(store.manifest.model_chain_order, 3)
    local = LocalChain([BlockEngine(store, s) for s in spans])
    await run(remote, prompt, 4, tokenizer, "warm-r")
    await run(local, prompt, 4, tokenizer, "warm-l")
    remote_runs, local_runs, timings = [], [], []
    for r in range(args.repeats):
        remote_runs.append(await run(remote, prompt, args.decode, tokenizer, f"r{r}", timings))
        local_runs.append(await run(local, prompt, args.decode, tokenizer, f"l{r}"))
    await remote.aclose()
    return remote_runs, local_runs, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every process")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the node processes inherit it

    store = ensure_demo_model()
    tokenizer = load_tokenizer(store)
    generator = torch.Generator().manual_seed(0)
    vocab = store.manifest.vocab_size
    prompt = torch.randint(100, vocab - 100, (args.prompt,), generator=generator).tolist()
    with tempfile.TemporaryDirectory(prefix="tiktrue-bench-") as base:
        homes, config = prepare_local_network(Path(base), store, nodes=3, network_id="bench")
        with LocalCluster(homes):
            remote_runs, local_runs, timings = asyncio.run(
                measure(args, store, tokenizer, prompt, homes, config)
            )
    same = remote_runs[0].token_ids == local_runs[0].token_ids

    def med(values):
        return statistics.median(values)

    r_decode = med(r.decode_tokens_per_second for r in remote_runs)
    l_decode = med(r.decode_tokens_per_second for r in local_runs)
    r_ttft = med(r.time_to_first_token for r in remote_runs) * 1000
    l_ttft = med(r.time_to_first_token for r in local_runs) * 1000
    hops = list(zip(*(t.hop_latencies_ms() for t in timings), strict=True))
    computes = list(zip(*([n["compute_ms"] for n in t.nodes] for t in timings), strict=True))
    names = ["gateway -> node1", "node1 -> node2", "node2 -> node3"]
    lines = [
        f"SmolLM2-135M-Instruct fp32, {args.threads} torch threads per process, "
        f"{args.prompt}-token prompt, {args.decode} greedy decode steps, median of "
        f"{args.repeats}; spans {', '.join(n['span'] for n in timings[0].nodes)}; "
        f"tokens identical to the one-process engine: {same}",
        "",
        "| | decode tok/s | time to first token ms |",
        "|---|---|---|",
        f"| 3 node processes (mutual TLS, chain forwarding) | {r_decode:.1f} | {r_ttft:.0f} |",
        f"| one-process engine, same 3 spans | {l_decode:.1f} | {l_ttft:.0f} |",
        f"| ratio network / one process | {r_decode / l_decode:.2f} | {r_ttft / l_ttft:.2f} |",
        "",
        "Per decode step (median over every step of every run):",
        "",
        "| hop | latency ms | receiver compute ms |",
        "|---|---|---|",
        *(
            f"| {name} | {med(h):.2f} | {med(c):.2f} |"
            for name, h, c in zip(names, hops, computes, strict=False)
        ),
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("Pipeline: 3 node processes vs one process (bench/pipeline.py)", lines)


if __name__ == "__main__":
    main()
