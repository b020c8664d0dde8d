"""Time to first token by priority class under load, through the demo network's gateway.

    python bench/priorities.py [--load 6] [--prompt 128] [--repeats 5] [--home DIR]

The demo network (SmolLM2-135M-Instruct, the GGUF's own weights; four node processes: the
admin with the gateway, two workers, one backup) answers ``--load`` normal chats that keep
generating (random 32-token prompts, long answers: the load). Each round then sends two
requests at once, each a random ``--prompt``-token prompt and 4 tokens of answer: in a
*classed* round one ``deep`` and one ``quick``, in a *baseline* round two ``normal`` ones;
rounds alternate, and so does which of the two is sent first. The time to first token of each
is measured from its send. The load's own tokens/s during each kind of round is reported too
(what the classes cost the others). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import websockets

from report import append
from tiktrue.demo import NETWORK_ID, start_demo_network
from tiktrue.model.store import BlockStore
from tiktrue.protocol.network_config import config_path, read_config

CEILING = 600.0  # seconds for one answer: a bound, not a measure


def body(message_id: str, prompt: list[int], max_tokens: int, priority: str) -> str:
    return json.dumps(
        {
            "header": {
                "message_id": message_id,
                "message_type": "inference_request",
                "protocol_version": "2.0",
            },
            "network_id": NETWORK_ID,
            "input_ids": prompt,
            "temperature": 0,
            "max_tokens": max_tokens,
            "priority": priority,
        }
    )


async def first_token_s(ws_url: str, prompt: list[int], priority: str, tag: str) -> float:
    async with websockets.connect(ws_url, max_size=None) as ws:
        began = time.perf_counter()
        await ws.send(body(tag, prompt, 4, priority))
        first = None
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
            if reply.get("status") == "processing" and first is None:
                first = time.perf_counter() - began
            elif reply.get("status") not in ("processing", "queued"):
                break
    if reply.get("status") != "success" or first is None:
        raise RuntimeError(f"the gateway answered {reply}")
    return first


class Load:
    """Normal chats answering all along; counts their tokens."""

    def __init__(self, ws_url: str, prompts: list[list[int]]) -> None:
        self.ws_url, self.prompts, self.tokens = ws_url, prompts, 0
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._chat(p, n)) for n, p in enumerate(prompts)]

    async def _chat(self, prompt: list[int], n: int) -> None:
        async with websockets.connect(self.ws_url, max_size=None) as ws:
            while not self.stop.is_set():
                await ws.send(body(f"load{n}", prompt, 256, "normal"))
                while True:
                    reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
                    if reply.get("status") == "processing":
                        self.tokens += 1
                    elif reply.get("status") != "queued":
                        break

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def measure(ws_url: str, args, vocab: int) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(100, vocab - 100, (length,), generator=generator).tolist()

    load = Load(ws_url, [prompt(32) for _ in range(args.load)])
    found: dict[str, list[float]] = {
        "quick": [],
        "deep": [],
        "normal": [],
        "load_classed": [],
        "load_baseline": [],
    }
    try:
        while load.tokens < 4 * args.load:  # the load decodes
            await asyncio.sleep(0.1)
        for r in range(2 * args.repeats):
            classed = r % 2 == 0
            kinds = ["deep", "quick"] if classed else ["normal", "normal"]
            if (r // 2) % 2:
                kinds.reverse()  # which one is sent first alternates too
            before, began = load.tokens, time.perf_counter()
            firsts = await asyncio.gather(
                *(
                    first_token_s(ws_url, prompt(args.prompt), k, f"r{r}{k}{i}")
                    for i, k in enumerate(kinds)
                )
            )
            rate = (load.tokens - before) / (time.perf_counter() - began)
            found["load_classed" if classed else "load_baseline"].append(rate)
            for kind, seconds in zip(kinds, firsts, strict=True):
                found[kind].append(seconds)
    finally:
        await load.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--load", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--home", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tiktrue-prio-") as scratch:
        home = (args.home or Path(scratch)).resolve()
        cluster = start_demo_network(home, nodes=4, log=lambda *_: None)
        try:
            ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
            config = read_config(config_path(home, NETWORK_ID))
            store = BlockStore(home / "models" / config.model_id)
            found = asyncio.run(measure(ws_url, args, store.manifest.vocab_size))
        finally:
            cluster.stop()

    med = {k: statistics.median(v) for k, v in found.items()}
    lines = [
        f"Demo network ({store.weight_format} weights; admin with the gateway, 2 workers, "
        f"1 backup; 4 node processes on this PC), {args.load} normal chats generating all "
        f"along; each round sends two requests at once ({args.prompt}-token random prompts, "
        f"4 tokens of answer): deep and quick, or (baseline) two normal ones; "
        f"{args.repeats} rounds of each kind, interleaved, medians. The machine is shared "
        "with other work: compare the ratios within this run only.",
        "",
        "| request | time to first token, s | × normal |",
        "|---|---|---|",
        *(
            f"| {kind} | {med[kind]:.2f} | {med[kind] / med['normal']:.2f} |"
            for kind in ("quick", "normal", "deep")
        ),
        "",
        f"Rounds, TTFT s: quick {', '.join(f'{x:.2f}' for x in found['quick'])}; "
        f"deep {', '.join(f'{x:.2f}' for x in found['deep'])}; "
        f"normal {', '.join(f'{x:.2f}' for x in found['normal'])}.",
        f"The load's tokens/s meanwhile: {med['load_classed']:.1f} in the classed rounds, "
        f"{med['load_baseline']:.1f} in the baseline ones.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("Priority classes: time to first token under load (bench/priorities.py)", lines)


if __name__ == "__main__":
    main()
