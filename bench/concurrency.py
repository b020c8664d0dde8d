"""Tokens per second of 1 against 8 concurrent sessions through the demo network's gateway.

    python bench/concurrency.py [--sessions 8] [--max-tokens 64] [--repeats 3] [--dtype D]
                                [--home DIR]

The demo network (SmolLM2-135M-Instruct, the GGUF's own int4/int8 weights unless ``--dtype``;
four node processes: the admin with the gateway, two workers, one backup) serves greedy
answers to clients of its WebSocket ``/ws``, each a session of its own with a random
32-token prompt. A round sends 1 request, or ``--sessions`` requests at once; rounds of both
kinds alternate, so a busy machine slows them alike. Throughput is every token streamed in a
round over the round's wall time (prompts included, as users see it). Each worker's step
scheduler tells how many of its steps ran in batches; RSS of every node process is read at
the end. The backup holds a replica of both workers' spans, so while the chain is busy it
serves new conversations as a second chain; then (unless ``--no-replica-phase``) the backup
is stopped and the concurrent rounds run again on the chain alone: the second chain's worth on
this PC (not interleaved: a phase after the other). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import websockets

from report import append
from tiktrue.demo import NETWORK_ID, start_demo_network
from tiktrue.model.store import BlockStore
from tiktrue.node.control_link import ControlLink
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.security.node_tls import NetworkCredentials

CEILING = 600.0  # seconds for one round: a bound, not a measure


async def answer(ws_url: str, prompt: list[int], max_tokens: int, n: int):
    """(token ids, seconds from the round's start to each token) of one greedy answer."""
    body = {
        "header": {
            "message_id": f"c{n}",
            "message_type": "inference_request",
            "protocol_version": "2.0",
        },
        "network_id": NETWORK_ID,
        "input_ids": prompt,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    tokens, times = [], []
    async with websockets.connect(ws_url, max_size=None) as ws:
        began = time.perf_counter()
        await ws.send(json.dumps(body))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
            if reply.get("status") == "processing":
                if reply.get("token_id") is not None:
                    tokens.append(reply["token_id"])
                    times.append(time.perf_counter() - began)
            elif reply.get("status") != "queued":
                break
    if reply.get("status") != "success":
        raise RuntimeError(f"the gateway answered {reply}")
    return tokens, times


async def round_of(ws_url: str, prompts: list[list[int]], max_tokens: int):
    """All prompts at once: (tokens per prompt, tokens per second of the round)."""
    began = time.perf_counter()
    results = await asyncio.gather(
        *(answer(ws_url, p, max_tokens, n) for n, p in enumerate(prompts))
    )
    wall = time.perf_counter() - began
    return [r[0] for r in results], sum(len(r[0]) for r in results) / wall


async def step_stats(home: Path) -> list[dict]:
    """Every chain node's span and step scheduler figures (``node_info``)."""
    config = read_config(config_path(home, NETWORK_ID))
    credentials = NetworkCredentials.load(home, NETWORK_ID)
    out = []
    for entry in [*config.chain(), *config.backups()]:
        address = f"{entry.host}:{entry.control_port}"
        async with ControlLink(address, expected_node_id=None, credentials=credentials) as link:
            info = await link.call("node_info")
        net = info["networks"][NETWORK_ID]
        span = f"{net['blocks'][0]}..{net['blocks'][-1]}"
        out.append({"span": span + (" (backup)" if entry.role == "backup" else ""), **net["steps"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="convert the GGUF (default: keep it)")
    parser.add_argument("--home", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--no-replica-phase", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tiktrue-conc-") as scratch:
        home = (args.home or Path(scratch)).resolve()
        cluster = start_demo_network(home, nodes=4, dtype=args.dtype, log=lambda *_: None)
        try:
            ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
            store = BlockStore(
                home / "models" / read_config(config_path(home, NETWORK_ID)).model_id
            )
            store_format = f"{store.weight_format} weights"
            vocab = store.manifest.vocab_size
            generator = torch.Generator().manual_seed(0)
            prompts = [
                torch.randint(100, vocab - 100, (args.prompt,), generator=generator).tolist()
                for _ in range(args.sessions)
            ]
            alone_tokens = {}
            asyncio.run(round_of(ws_url, prompts[:1], 8))  # warm up
            one, many, identical = [], [], []
            for r in range(args.repeats):  # interleaved
                tokens, rate = asyncio.run(
                    round_of(ws_url, [prompts[r % len(prompts)]], args.max_tokens)
                )
                alone_tokens[r % len(prompts)] = tokens[0]
                one.append(rate)
                tokens, rate = asyncio.run(round_of(ws_url, prompts, args.max_tokens))
                many.append(rate)
                identical += [tokens[i] == t for i, t in alone_tokens.items()]
            steps = asyncio.run(step_stats(home))
            rss = []  # (span, MB) of every node process
            for h, process in zip(cluster.homes, cluster.processes, strict=True):
                info = json.loads(run_file(h).read_text())
                span = info["networks"].get(NETWORK_ID, {}).get("span", "no span")
                rss.append((span, psutil.Process(process.pid).memory_info().rss / 1e6))
            alone_chain = []
            if not args.no_replica_phase:
                cluster.kill(len(cluster.processes) - 1)  # the backup: no second chain
                asyncio.run(round_of(ws_url, prompts, 8))  # its failure noticed once
                for _ in range(args.repeats):
                    tokens, rate = asyncio.run(round_of(ws_url, prompts, args.max_tokens))
                    alone_chain.append(rate)
                    identical += [tokens[i] == t for i, t in alone_tokens.items()]
        finally:
            cluster.stop()

    rate1, rate_n = statistics.median(one), statistics.median(many)
    lines = [
        f"Demo network ({store_format}; admin with the gateway, 2 workers, 1 backup; "
        f"4 node processes on this PC), greedy, {args.prompt}-token random prompts, up to "
        f"{args.max_tokens} tokens each, median of {args.repeats} interleaved rounds",
        "",
        "| concurrent sessions | tokens/s, all sessions | × one session |",
        "|---|---|---|",
        f"| 1 | {rate1:.1f} | 1.00 |",
        f"| {args.sessions} | {rate_n:.1f} | {rate_n / rate1:.2f} |",
        *(
            [
                f"| {args.sessions}, backup stopped (no second chain) | "
                f"{statistics.median(alone_chain):.1f} | "
                f"{statistics.median(alone_chain) / rate1:.2f} |"
            ]
            if alone_chain
            else []
        ),
        "",
        f"Rounds, tokens/s: 1 session {', '.join(f'{x:.1f}' for x in one)}; "
        f"{args.sessions} sessions {', '.join(f'{x:.1f}' for x in many)}"
        + (
            f"; then without the backup {', '.join(f'{x:.1f}' for x in alone_chain)}. "
            if alone_chain
            else ". "
        )
        + f"Answers of the concurrent rounds equal to the same prompt alone: "
        f"{sum(identical)}/{len(identical)}.",
        "",
        "| node span | steps run | in batches | engine rounds | largest batch |",
        "|---|---|---|---|---|",
        *(
            f"| {s['span']} | {s['steps']} | {s['batched_steps']} | {s['rounds']} "
            f"| {s['largest_batch']} |"
            for s in steps
        ),
        "",
        "RSS per node process at the end, MB: " + ", ".join(f"{s} {mb:.0f}" for s, mb in rss),
    ]
    print("\n".join(lines))
    if not args.no_record:
        append(
            "Concurrency: 1 vs several sessions through the gateway (bench/concurrency.py)", lines
        )


if __name__ == "__main__":
    main()
