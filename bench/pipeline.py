"""Decode speed and time to first token through 3 node processes vs the one-process engine.

    python bench/pipeline.py [--decode 64] [--prompt 64] [--repeats 3] [--threads 2] [--dtype D]

SmolLM2-135M-Instruct (the GGUF's own int4/int8 weights, or ``--dtype``), greedy, the same
3 spans. The network side is what a user runs:
three ``tiktrue node`` processes on 127.0.0.1 with mutual TLS, the first one also the gateway;
this process is a client of the gateway's WebSocket ``/ws`` and times the streamed tokens as
they arrive. The one-process engine runs the same spans and token loop in this process.

Per decode step the gateway reports each node's compute and the time in transit: the round
trip less every node's own time, i.e. all hops of the step together (network, TLS, framing,
queues, thread hand-offs); per hop is that divided by the hops, set against the median ping
round trip of the same links (a raw TLS WebSocket ping-pong between the same processes, in
the same run). A control run times the one-process spans when each waits, before it
computes, as long as the other spans took: what being an idle pipeline stage costs on this
machine with no network at all. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import websockets

from report import append
from tiktrue.model.demo_model import ensure_demo_model
from tiktrue.model.engine import BlockEngine, split_evenly
from tiktrue.model.generation import GenerationResult, LocalChain, stream_tokens
from tiktrue.model.sampling import SamplingParams
from tiktrue.model.tokenizer import load_tokenizer
from tiktrue.service.local_network import LocalCluster, prepare_local_network


class TimedChain(LocalChain):
    """The one-process chain, timing each span's decode steps. With ``idle`` each span first
    sleeps as long as the other spans took at the last step, as a pipeline stage idles."""

    def __init__(self, engines, *, idle: bool = False) -> None:
        super().__init__(engines)
        self.idle = idle
        self.last = [0.0] * len(engines)
        self.compute_s: list[list[float]] = [[] for _ in engines]

    def forward(self, session_id, token_ids, start):
        x = torch.tensor(token_ids, dtype=torch.long)
        for i, engine in enumerate(self.engines):
            decode = len(token_ids) == 1
            if self.idle and decode:
                time.sleep(sum(self.last) - self.last[i])
            began = time.perf_counter()
            x = engine.forward(session_id, x, start)
            self.last[i] = time.perf_counter() - began
            if decode:
                self.compute_s[i].append(self.last[i])
        return x[0]

    def median_ms(self) -> list[float]:
        return [statistics.median(c) * 1000 for c in self.compute_s]


@dataclass
class Run:
    tokens: list[int]
    ttft_s: float
    decode_tok_s: float
    usage: dict


async def through_gateway(api_url: str, prompt: list[int], steps: int) -> Run:
    """One answer streamed by the gateway, timed on arrival."""
    url = api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
    request = {
        "header": {"message_type": "inference_request", "protocol_version": "2.0"},
        "network_id": "bench",
        "input_ids": prompt,
        "temperature": 0,
        "max_tokens": steps + 1,
    }
    tokens, arrivals = [], []
    async with websockets.connect(url, max_size=None) as ws:
        began = time.perf_counter()
        await ws.send(json.dumps(request))
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("status") != "processing":
                break
            if reply.get("token_id") is not None:
                tokens.append(reply["token_id"])
                arrivals.append(time.perf_counter())
    if reply.get("status") != "success":
        raise RuntimeError(f"the gateway answered {reply}")
    decode = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    return Run(tokens, arrivals[0] - began, decode, reply["usage"])


async def in_process(chain: LocalChain, prompt, steps, tokenizer, session) -> Run:
    chain.open(session)
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
        pass
    chain.close(session)
    return Run(result.token_ids, result.time_to_first_token, result.decode_tokens_per_second, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every process")
    parser.add_argument("--dtype", default=None, help="convert the GGUF (default: keep it)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the node processes inherit it

    store = ensure_demo_model(dtype=args.dtype)
    tokenizer = load_tokenizer(store)
    generator = torch.Generator().manual_seed(0)
    vocab = store.manifest.vocab_size
    prompt = torch.randint(100, vocab - 100, (args.prompt,), generator=generator).tolist()
    spans = split_evenly(store.manifest.model_chain_order, 3)
    engines = [BlockEngine(store, s) for s in spans]
    local = TimedChain(engines)
    idle = TimedChain(engines, idle=True)
    remote_runs, local_runs = [], []
    with tempfile.TemporaryDirectory(prefix="tiktrue-bench-") as base:
        homes, _ = prepare_local_network(Path(base), store, nodes=3, network_id="bench")
        with LocalCluster(homes) as cluster:
            asyncio.run(through_gateway(cluster.api_url, prompt, 4))  # warm up
            asyncio.run(in_process(local, prompt, 4, tokenizer, "warm"))
            for r in range(args.repeats):
                remote_runs.append(
                    asyncio.run(through_gateway(cluster.api_url, prompt, args.decode))
                )
                local_runs.append(
                    asyncio.run(in_process(local, prompt, args.decode, tokenizer, f"l{r}"))
                )
                asyncio.run(in_process(idle, prompt, args.decode, tokenizer, f"i{r}"))
    same = remote_runs[0].tokens == local_runs[0].tokens

    def med(values):
        return statistics.median(values)

    r_decode = med(r.decode_tok_s for r in remote_runs)
    l_decode = med(r.decode_tok_s for r in local_runs)
    # each network run is paired with the one-process run right after it: this machine's
    # speed drifts between minutes, a pair's ratio does not
    pairs = zip(remote_runs, local_runs, strict=True)
    ratios = sorted(net.decode_tok_s / one.decode_tok_s for net, one in pairs)
    r_ttft = med(r.ttft_s for r in remote_runs) * 1000
    l_ttft = med(r.ttft_s for r in local_runs) * 1000
    usage = remote_runs[len(remote_runs) // 2].usage
    compute = usage["node_compute_ms"]
    transit, hops = usage["transit_ms"], usage["hops"]
    links = ["gateway -> node1 (in-process)", "node1 -> node2", "node2 -> node3"]
    links += ["node3 -> node1 (the answer)"]
    rtts = ["-" if v is None else f"{v:.2f}" for v in usage["link_rtt_ms"][1:]]
    pings = [v for r in remote_runs for v in r.usage["link_rtt_ms"][1:] if v]
    per_hop = [r.usage["transit_ms"] / max(r.usage["hops"], 1) for r in remote_runs]
    hop, ping = med(per_hop), med(pings)
    plain, waiting = local.median_ms(), idle.median_ms()
    lines = [
        f"SmolLM2-135M-Instruct ({store.weight_format} weights), {args.threads} torch threads "
        "per process, "
        f"{args.prompt}-token prompt, {args.decode} greedy decode steps, median of "
        f"{args.repeats}; spans {', '.join(usage['nodes'])}; gateway in node1's process, "
        f"timed by a /ws client; tokens identical to the one-process engine: {same}",
        "",
        "| | decode tok/s | time to first token ms |",
        "|---|---|---|",
        f"| 3 node processes (mutual TLS, chain forwarding) | {r_decode:.1f} | {r_ttft:.0f} |",
        f"| one-process engine, same 3 spans | {l_decode:.1f} | {l_ttft:.0f} |",
        f"| ratio network / one process | {r_decode / l_decode:.2f} | {r_ttft / l_ttft:.2f} |",
        "",
        f"Decode ratio of each run with the one-process run right after it: "
        f"{', '.join(f'{x:.2f}' for x in ratios)} (median {med(ratios):.2f}).",
        "",
        "Per decode step (median of one run's steps), ms:",
        "",
        "| span | compute in its node | same span, one process | one process, idle first "
        "| ping RTT of the link to the next |",
        "|---|---|---|---|---|",
        *(
            f"| {span} | {c:.2f} | {p:.2f} | {w:.2f} | {rtt} |"
            for span, c, p, w, rtt in zip(
                usage["nodes"], compute, plain, waiting, rtts, strict=False
            )
        ),
        f"| all 3 spans | {sum(compute):.2f} | {sum(plain):.2f} | {sum(waiting):.2f} | |",
        "",
        f"In transit per step: {transit:.2f} ms over {hops} hops ({', '.join(links[1:])}), "
        f"{transit / max(hops, 1):.2f} ms per hop; the gateway hands steps to node1 in-process.",
        "",
        f"Per hop, median of every run: {hop:.2f} ms in transit against a ping round trip of "
        f"{ping:.2f} ms on the same links: {hop / ping:.2f}x the raw ping (runs: "
        f"{', '.join(f'{x:.2f}' for x in per_hop)} ms).",
        "",
        "'One process, idle first': each span sleeps, before it computes, as long as the other "
        "two took (as a pipeline stage waits); no network, no node service.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("Pipeline: 3 node processes vs one process (bench/pipeline.py)", lines)


if __name__ == "__main__":
    main()
