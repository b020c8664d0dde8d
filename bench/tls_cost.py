"""What mutual TLS and the challenge cost, per connection and per token.

    python bench/tls_cost.py [--connections 200] [--steps 2000] [--hidden 576]

Both ends run in this process on 127.0.0.1 (so each figure holds the CPU of both sides), with a
network CA and two node certificates made for the run. Per connection, the median time to
open a WebSocket: plain (no TLS), mutual TLS 1.3, and mutual TLS plus hello and the challenge
both ways (``node.handshake``, what every block link does). Per token, the median round trip of
one step-sized binary frame (1 x 1 x ``--hidden`` fp32 hidden states, SmolLM2's width by
default, plus its header) on an open connection: plain, TLS, and TLS after the challenge. The
kinds take turns, so a busy moment of a shared machine hits each alike. The challenge has no
code on the per-token path, so the last two should match.
Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
import websockets

from report import append
from tiktrue.node import handshake
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.security.auth_manager import create_network_ca
from tiktrue.security.node_tls import NetworkCredentials, install_certificate, node_identity

NET = "bench-tls"


def credentials(base: Path) -> tuple[NetworkCredentials, NetworkCredentials]:
    ca = create_network_ca(NET, base / "ca")
    made = []
    for name in ("server", "client"):
        home = base / name
        identity = node_identity(home)
        cert = ca.generate_node_certificate(identity.node_id, identity.public_key, "worker")
        install_certificate(home, NET, ca.cert_pem, cert)
        made.append(NetworkCredentials.load(home, NET))
    return made[0], made[1]


async def echo(ws) -> None:
    async for message in ws:
        await ws.send(message)


def challenged(server: NetworkCredentials):
    async def handler(ws) -> None:
        hello = ps.parse_message(await ws.recv()).message
        await handshake.accept(ws, hello, server)
        await echo(ws)

    return handler


async def serve(handler, ssl=None):
    return await websockets.serve(handler, "127.0.0.1", 0, ssl=ssl, compression=None)


def port(server) -> int:
    return server.sockets[0].getsockname()[1]


async def open_link(url: str, context, challenger: NetworkCredentials | None):
    """A connection (TLS when ``context``), through the challenge when ``challenger``."""
    ws = await websockets.connect(url, ssl=context, compression=None)
    if challenger is not None:
        hello = ps.Hello(node_id=challenger.identity.node_id, network_id=NET)
        await handshake.offer(ws, hello, challenger)
    return ws


async def per_connection(kinds: dict, count: int) -> dict[str, list[float]]:
    """Open and close a connection of each kind in turn (so a busy moment hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(count):
        for name, (url, context, challenger) in kinds.items():
            began = time.perf_counter()
            ws = await open_link(url, context, challenger)
            times[name].append((time.perf_counter() - began) * 1000)
            await ws.close()
    return times


async def per_step(kinds: dict, frame: bytes, count: int) -> dict[str, list[float]]:
    """One open connection of each kind; a frame's round trip on each in turn."""
    links = {name: await open_link(*kind) for name, kind in kinds.items()}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for round_ in range(count + 20):  # the first 20: warm-up
        for name, ws in links.items():
            began = time.perf_counter()
            await ws.send(frame)
            await ws.recv()
            if round_ >= 20:
                times[name].append((time.perf_counter() - began) * 1000)
    for ws in links.values():
        await ws.close()
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered):.3f} ms, p95 {p95:.3f} ms (n={len(ordered)})"


async def measure(args) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        server_creds, client = credentials(Path(tmp))
        plain = await serve(echo)
        tls = await serve(echo, server_creds.server_context())
        full = await serve(challenged(server_creds), server_creds.server_context())
        context = client.client_context()  # made once, as a link keeps its own
        kinds = {
            "plain WebSocket (no TLS)": (f"ws://127.0.0.1:{port(plain)}", None, None),
            "mutual TLS 1.3": (f"wss://127.0.0.1:{port(tls)}", context, None),
            "mutual TLS 1.3 + hello + challenge": (
                f"wss://127.0.0.1:{port(full)}",
                context,
                client,
            ),
        }
        hidden = torch.randn(1, 1, args.hidden)
        frame = encode_tensor_frame(
            hidden, kind="forward", network_id=NET, session_id="s", message_id="m" * 32, start=7
        )
        connect = await per_connection(kinds, args.connections)
        step = await per_step(kinds, frame, args.steps)
        for server in (plain, tls, full):
            server.close()
            await server.wait_closed()
    names = list(kinds)
    median = {name: statistics.median(connect[name]) for name in names}
    token = {name: statistics.median(step[name]) for name in names}
    lines = [
        f"- both ends in one process on 127.0.0.1; a step frame is {len(frame)} bytes "
        f"(1 x 1 x {args.hidden} fp32 hidden states + header)",
        "- per connection (time to open one):",
        *(f"  - {name}: {summary(connect[name])}" for name in names),
        f"  - the challenge adds {median[names[2]] - median[names[1]]:.2f} ms to a TLS "
        f"connection ({median[names[2]] / median[names[1]]:.2f}x); TLS adds "
        f"{median[names[1]] - median[names[0]]:.2f} ms to a plain one",
        "- per token (one step frame's round trip on an open connection):",
        *(f"  - {name}: {summary(step[name])}" for name in names),
        f"  - after the challenge / TLS alone: {token[names[2]] / token[names[1]]:.2f}x "
        "(the challenge runs no code per token); TLS / plain: "
        f"{token[names[1]] / token[names[0]]:.2f}x",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    lines = asyncio.run(measure(args))
    print("\n".join(lines))
    if not args.no_write:
        append(
            "TLS and the challenge: cost per connection and per token (bench/tls_cost.py)", lines
        )


if __name__ == "__main__":
    main()
