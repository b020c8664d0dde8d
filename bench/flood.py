"""A 32-token chat while callers without a certificate hammer the nodes' ports.

    python bench/flood.py [--tokens 32] [--loops 6] [--repeats 5] [--source ADDR]
                          [--ports control|block|both] [--nice 19] [--no-record]

SmolLM2-135M-Instruct (the GGUF's own weights) on 3 node processes on 127.0.0.1, the first
also the gateway; a greedy chat of ``--tokens`` tokens through the gateway's ``/ws``, timed
from the request to the last token. Alone, then while ``--loops`` flood processes run: each
one connects to a node without a certificate, says hello (the challenge), asks ``node_info``,
closes and starts again, over the three nodes' control ports in turn (what ``tiktrue network
discover --manual`` does once); with ``--ports block`` (or ``both``) it opens TLS connections
to the block servers' ports as well (refused in the handshake: no certificate).

``--source``: the address the flood connects from. ``127.0.0.2`` plays another PC of the LAN
(Linux routes all of 127/8 to the loopback); ``127.0.0.1`` (the default) is the nodes' own
address, the worst case for caps counted per source. The flood processes run at the lowest
CPU priority (``--nice 19``): on a LAN the flood's own work is another PC's, and on a 2-core
machine six busy clients would otherwise slow the chat by taking the cores, whatever the
nodes do (``--nice 0`` measures that too, as the issue did). Rounds alternate alone /
flooded, so the machine's drift hits both; the figures are the median of each flooded chat's
time over the chat alone right before it, and the fastest flooded chat over the fastest alone
(others' work on a shared machine only ever slows a chat down: the fastest of many is the
least disturbed). The CPU the three node processes spend in a window of ``--window`` seconds
without a chat, quiet and then flooded (psutil's CPU times of the processes), is what the
flood costs the nodes, and hardly depends on others' work. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import websockets

from report import append
from tiktrue.model.demo_model import ensure_demo_model
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import list_configs
from tiktrue.security.auth_manager import new_challenge
from tiktrue.security.node_tls import control_client_context
from tiktrue.service.local_network import LocalCluster, prepare_local_network


async def chat(api_url: str, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """Seconds from the request to the last token of one greedy answer, and its tokens."""
    url = api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
    request = {
        "header": {"message_type": "inference_request", "protocol_version": "2.0"},
        "network_id": "flood",
        "input_ids": prompt,
        "temperature": 0,
        "max_tokens": tokens,
    }
    got = []
    async with websockets.connect(url, max_size=None) as ws:
        began = time.perf_counter()
        await ws.send(json.dumps(request))
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("status") != "processing":
                break
            if reply.get("token_id") is not None:
                got.append(reply["token_id"])
        took = time.perf_counter() - began
    if reply.get("status") != "success":
        raise RuntimeError(f"the gateway answered {reply}")
    return took, got


async def _node_info(address: str, source: str | None) -> None:
    """One certificate-less ``node_info``, as a PC that has not joined asks it."""
    local = (source, 0) if source else None
    async with websockets.connect(
        f"wss://{address}",
        ssl=control_client_context(None),
        local_addr=local,
        compression=None,
        open_timeout=10,
        close_timeout=1,
    ) as ws:
        await ws.send(json.dumps({"op": "hello", "id": "h", "nonce": new_challenge().hex()}))
        await ws.recv()
        await ws.send(json.dumps({"op": "node_info", "id": "n"}))
        reply = json.loads(await ws.recv())
        if not reply.get("ok"):
            raise RuntimeError(reply)


async def _block_hello(address: str, source: str | None) -> None:
    """A TLS connection to a block server without a certificate (refused in the
    handshake)."""
    host, port = address.rsplit(":", 1)
    local = (source, 0) if source else None
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, int(port), ssl=control_client_context(None), local_addr=local
        ),
        10,
    )
    writer.close()


def flood_process(targets, source, nice, on, stop, results) -> None:
    """One flood loop, in its own process (at the lowest priority by default): hammer while
    ``on``."""
    os.nice(nice)
    results.put("ready")  # imported (a spawned process takes seconds): it can start now

    async def run() -> dict:
        counts = {"answered": 0, "failed": 0, "seconds": 0.0}
        while not stop.is_set():
            if not on.is_set():
                await asyncio.sleep(0.05)
                continue
            began = time.monotonic()
            for kind, address in targets:
                if not on.is_set():
                    break
                try:
                    if kind == "control":
                        await _node_info(address, source)
                    else:
                        await _block_hello(address, source)
                    counts["answered"] += 1
                except Exception:  # closed by a cap, refused, timed out: the flood goes on
                    counts["failed"] += 1
            counts["seconds"] += time.monotonic() - began
        return counts

    results.put(asyncio.run(run()))


def _cpu_share(processes: list[psutil.Process], seconds: float, also=None):
    """Cores the ``processes`` used together (user + system) over ``seconds`` of wall time
    (and, with ``also``, the cores those other processes used meanwhile)."""

    def used(group) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in group)

    began, others, wall = used(processes), used(also or []), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - wall
    share = (used(processes) - began) / elapsed
    return share if also is None else (share, (used(also) - others) / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--loops", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", default="127.0.0.1", help="the flood's own address")
    parser.add_argument("--ports", choices=("control", "block", "both"), default="control")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every process")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of CPU measured")
    parser.add_argument(
        "--nice", type=int, default=19, help="the flood's priority (0: as the issue measured it)"
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the node processes inherit it

    store = ensure_demo_model()
    generator = torch.Generator().manual_seed(0)
    vocab = store.manifest.vocab_size
    prompt = torch.randint(100, vocab - 100, (args.prompt,), generator=generator).tolist()
    spawn = multiprocessing.get_context("spawn")
    on, stop, results = spawn.Event(), spawn.Event(), spawn.Queue()
    alone, flooded, answers = [], [], set()
    with tempfile.TemporaryDirectory(prefix="tiktrue-flood-") as base:
        homes, _ = prepare_local_network(Path(base), store, nodes=3, network_id="flood")
        with LocalCluster(homes) as cluster:
            targets = []
            if args.ports in ("control", "both"):
                targets += [
                    ("control", json.loads(run_file(h).read_text())["control"]) for h in homes
                ]
            if args.ports in ("block", "both"):
                config = list_configs(homes[0])[0]
                targets += [("block", n.address) for n in config.nodes]
            loops = [
                spawn.Process(
                    target=flood_process, args=(targets, args.source, args.nice, on, stop, results)
                )
                for _ in range(args.loops)
            ]
            for process in loops:
                process.start()
            for _ in loops:
                assert results.get(timeout=600) == "ready"
            asyncio.run(chat(cluster.api_url, prompt, 4))  # warm up
            nodes = [psutil.Process(p.pid) for p in cluster.processes]
            clients = [psutil.Process(p.pid) for p in loops]
            try:
                quiet = _cpu_share(nodes, args.window)
                on.set()
                time.sleep(1.0)
                busy, flooding = _cpu_share(nodes, args.window, also=clients)
                on.clear()
                time.sleep(0.5)
                for _ in range(args.repeats):
                    took, tokens = asyncio.run(chat(cluster.api_url, prompt, args.tokens))
                    alone.append(took)
                    answers.add(tuple(tokens))
                    on.set()
                    time.sleep(1.0)  # the flood in full swing before the chat starts
                    took, tokens = asyncio.run(chat(cluster.api_url, prompt, args.tokens))
                    flooded.append(took)
                    answers.add(tuple(tokens))
                    on.clear()
                    time.sleep(0.5)
            finally:
                on.clear()
                stop.set()
                counts = [results.get(timeout=60) for _ in loops]
                for process in loops:
                    process.join(10)
    seconds = sum(c["seconds"] for c in counts) / max(len(counts), 1)
    answered = sum(c["answered"] for c in counts) / max(seconds, 1e-9)
    failed = sum(c["failed"] for c in counts) / max(seconds, 1e-9)
    ratios = sorted(f / a for a, f in zip(alone, flooded, strict=True))
    med = statistics.median
    lines = [
        f"SmolLM2-135M-Instruct ({store.weight_format} weights), 3 node processes on "
        f"127.0.0.1, {args.threads} torch threads each; a greedy {args.tokens}-token chat "
        f"({args.prompt}-token prompt) through the gateway's /ws, {args.repeats} rounds of "
        f"alone / flooded; {args.loops} flood processes (nice {args.nice}) from {args.source} "
        f"on the {args.ports} ports; the same answer every time: {len(answers) == 1}",
        "",
        "| | chat s, median | fastest |",
        "|---|---|---|",
        f"| alone | {med(alone):.2f} | {min(alone):.2f} |",
        f"| while flooded | {med(flooded):.2f} | {min(flooded):.2f} |",
        f"| flooded / alone | {med(flooded) / med(alone):.2f} | "
        f"**{min(flooded) / min(alone):.2f}** |",
        "",
        f"Flooded / alone, each round: {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(median {med(ratios):.2f}).",
        "",
        f"The flood while it ran: {answered:.1f} connections/s served "
        f"(node_info answered, or a block port's handshake done), {failed:.1f}/s closed "
        "or refused.",
        "",
        f"CPU of the 3 node processes, {args.window:.0f} s without a chat: {quiet:.2f} cores "
        f"quiet, {busy:.2f} cores flooded (the flood costs the nodes {busy - quiet:.2f} cores; "
        f"{psutil.cpu_count()} cores here); the flood processes themselves used "
        f"{flooding:.2f} cores.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("A chat while callers without a certificate flood the ports (bench/flood.py)", lines)


if __name__ == "__main__":
    main()
