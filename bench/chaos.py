"""Answers that survive a lost PC, measured on the demo network (SmolLM2 with its default
int4/int8 weights, 4 node processes: admin, two workers, one backup of both workers).

    python bench/chaos.py [--n 100] [--fault kill|freeze] [--max-tokens 48] [--home DIR]

For each of ``n`` answers a random worker of the chain is lost after a random number of
streamed tokens (among the first ones): ``kill`` (SIGKILL: the PC switched off; its sockets
are reset at once) or ``freeze`` (SIGSTOP: the PC hangs, or its cable is pulled: nothing is
reset, it just stops answering). The answer must complete, token-identical to the same
greedy answer undisturbed (measured before any fault). The pause is the longest gap between
two tokens of the answer (the one the fault caused), set against the median gap. Then the
lost node comes back (started again, or SIGCONT) and the bench waits until the admin has
planned it back in (the backup in place again) before the next answer. A fault that lands
after the chain has already computed the whole answer (the client reads behind the chain)
takes nothing over; such a round is told apart (the config did not change), not counted, and
run again. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import time
import uuid
from pathlib import Path

import websockets

from report import append
from tiktrue.demo import NETWORK_ID, start_demo_network
from tiktrue.protocol.network_config import config_path, read_config

PROMPTS = [  # each gets a long answer (the node is killed among its first tokens)
    "Write a long story about a cat.",
    "Describe the sea in detail.",
    "Explain how a computer works, step by step.",
    "Write a letter to a friend about your holiday.",
]
CEILING = 300.0  # seconds for one answer or one recovery: a bound, not a measure


def ws_url(api_url: str) -> str:
    return api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"


async def stream(api_url: str, prompt: str, max_tokens: int, on_token=None):
    """(token ids, arrival times, final message) of one greedy chat answer over /ws (a
    session of its own: the prompt is a user turn in the chat template; closed after)."""
    session_id = f"chaos-{uuid.uuid4().hex}"
    body = {
        "header": {
            "message_id": "chaos",
            "message_type": "inference_request",
            "protocol_version": "2.0",
        },
        "network_id": NETWORK_ID,
        "session_id": session_id,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    tokens, times = [], []
    async with websockets.connect(ws_url(api_url), max_size=None) as ws:
        await ws.send(json.dumps(body))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
            status = reply.get("status")
            if status == "processing":
                tokens.append(reply["token_id"])
                times.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(tokens))
            elif status == "queued":
                continue
            else:
                close = {**body, "header": {**body["header"], "message_type": "session_close"}}
                await ws.send(json.dumps(close))
                await asyncio.wait_for(ws.recv(), CEILING)
                return tokens, times, reply


def config(home: Path):
    return read_config(config_path(home, NETWORK_ID))


def wait_planned_back(home: Path, after_version: int) -> float:
    """Seconds until the admin planned the returned node back in (a config after the
    failover's), with a backup again."""
    began = time.monotonic()
    while True:
        now = config(home)
        if now.version > after_version and now.backups():
            return time.monotonic() - began
        if time.monotonic() - began > CEILING:
            raise TimeoutError("the killed node was not planned back in")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="answers, one node lost in each")
    parser.add_argument(
        "--fault",
        choices=("kill", "freeze"),
        default="kill",
        help="how the node is lost: SIGKILL (sockets reset) or SIGSTOP (silent)",
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--home", type=Path, default=Path(".tiktrue/bench-chaos"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", default=None, help="the demo model's weights (default: the GGUF's int4/int8)"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    cluster = start_demo_network(home, nodes=4, dtype=args.dtype)
    homes = cluster.homes
    try:
        reference = {}
        normal_gaps = []
        for prompt in PROMPTS:
            tokens, times, final = asyncio.run(stream(cluster.api_url, prompt, args.max_tokens))
            assert final.get("status") == "success", final
            assert len(tokens) >= 12, f"too short an answer to kill a node in: {final}"
            reference[prompt] = tokens
            normal_gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
        completed = identical = late = 0
        stopped: list[int] = []  # SIGINT: stop after the answer in hand, report what was done
        signal.signal(signal.SIGINT, lambda *_: stopped.append(1))
        pauses, recoveries = [], []
        i = 0
        while i < args.n and not stopped:
            prompt = PROMPTS[i % len(PROMPTS)]
            now = config(home)
            ids = [n.node_id for n in now.chain()[1:]]  # workers: the admin is not failed over
            victim_id = rng.choice(ids)
            victim = next(k for k, h in enumerate(homes) if _node_id(h) == victim_id)
            kill_at = rng.randint(2, max(2, min(8, len(reference[prompt]) // 4)))

            def hit(count, victim=victim, kill_at=kill_at):
                if count == kill_at:
                    lose(cluster, victim, args.fault)

            try:
                tokens, times, final = asyncio.run(
                    stream(cluster.api_url, prompt, args.max_tokens, hit)
                )
            except Exception as exc:  # counted as not completed
                print(f"answer {i + 1}: failed: {exc!r}")
                tokens, times, final = [], [], {}
            if config(home).version == now.version and late < args.n:
                late += 1  # the chain had finished this answer: nothing was taken over
                print(f"answer {i + 1}: the fault came after the chain's last step; again")
                bring_back(cluster, victim, args.fault)
                _wait_serving(cluster)
                continue
            i += 1
            ok = final.get("status") == "success"
            same = tokens == reference[prompt]
            completed += ok
            identical += same
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            pause = max(gaps[kill_at - 1 :], default=float("nan"))
            pauses.append(pause)
            failed_over = config(home).version  # the failover's config, before the return
            bring_back(cluster, victim, args.fault)
            recoveries.append(wait_planned_back(home, failed_over))
            if not same:  # where it went another way, for whoever looks into it
                at = next(
                    (
                        k
                        for k, (x, y) in enumerate(zip(tokens, reference[prompt], strict=False))
                        if x != y
                    ),
                    None,
                )
                print(f"  differs from token {at}: {tokens[:24]} vs {reference[prompt][:24]}")
            print(
                f"answer {i}/{args.n}: {args.fault} {victim_id} after {kill_at} tokens; "
                f"{'completed' if ok else 'FAILED'}, {'identical' if same else 'DIFFERENT'}, "
                f"pause {pause * 1000:.0f} ms; planned back in {recoveries[-1]:.1f} s"
            )
    finally:
        cluster.stop()

    def ms(values, q):
        values = sorted(v for v in values if v == v)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    done = len(pauses)
    lines = [
        f"- answers: {done} (of {args.n} asked), each with a random worker lost mid-answer "
        f"({FAULTS[args.fault]}); greedy, max {args.max_tokens} tokens; demo network (admin, 2 "
        f"workers, 1 backup), weights {args.dtype or 'the GGUF int4/int8'}",
        f"- completed: {completed}/{done}; token-identical to the undisturbed answer: "
        f"{identical}/{done}",
        f"- pause (longest gap between two tokens after the kill): median "
        f"{statistics.median(pauses) * 1000:.0f} ms, p95 {ms(pauses, 0.95):.0f} ms, "
        f"max {max(pauses) * 1000:.0f} ms",
        f"- a normal gap between two tokens: median {statistics.median(normal_gaps) * 1000:.0f}"
        f" ms, p95 {ms(normal_gaps, 0.95):.0f} ms",
        f"- the lost node back and planned back in (backup in place again): median "
        f"{statistics.median(recoveries):.1f} s",
        f"- faults that came after the chain's last step (not counted, run again): {late}",
    ]
    print("\n".join(lines))
    append(f"Chaos: a worker lost in every answer, --fault {args.fault} (bench/chaos.py)", lines)


FAULTS = {
    "kill": "SIGKILL: its sockets are reset at once",
    "freeze": "SIGSTOP: silent, nothing reset, as a pulled cable",
}


def lose(cluster, victim: int, fault: str) -> None:
    if fault == "kill":
        cluster.kill(victim)
    else:
        cluster.processes[victim].send_signal(signal.SIGSTOP)


def bring_back(cluster, victim: int, fault: str) -> None:
    if fault == "kill":
        cluster.restart(victim)
    else:
        cluster.processes[victim].send_signal(signal.SIGCONT)


def _wait_serving(cluster) -> None:
    """Until an answer goes through the whole chain again (the restarted node serves)."""
    began = time.monotonic()
    while True:
        try:
            _, _, final = asyncio.run(stream(cluster.api_url, PROMPTS[0], 2))
            if final.get("status") == "success":
                return
        except Exception:
            pass
        if time.monotonic() - began > CEILING:
            raise TimeoutError("the restarted node did not serve again")
        time.sleep(0.5)


def _node_id(home: Path) -> str:
    from tiktrue.security.node_tls import node_identity

    return node_identity(home).node_id


if __name__ == "__main__":
    main()
