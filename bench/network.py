"""Memory of each worker against what it holds, and block transfer speed, on SmolLM2.

    python bench/network.py

Builds the demo network (3 node processes, caps of 600 MB each, plan, encrypted distribution)
in a scratch folder, runs a short chat, then reads every node's RSS. A node's budget is its
blocks' bytes + its KV budget + the runtime baseline (the RSS of a node service holding no
blocks, measured here too). Transfer: the admin pushes a full copy of the model's blocks to a
worker over the control channel (TLS 1.3 + AES-256-GCM per chunk + per-chunk sha256 checks),
timed end to end. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from report import append
from tiktrue.control.distributor import push_blocks
from tiktrue.control.network_admin import network_status, node_report
from tiktrue.demo import NETWORK_ID, start_demo_network
from tiktrue.model.store import MANIFEST, BlockStore
from tiktrue.paths import data_dir, run_file
from tiktrue.protocol.network_config import NodeEntry, config_path, read_config
from tiktrue.security.node_tls import NetworkCredentials
from tiktrue.service.local_network import LocalCluster


def chat(api_url: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 48,
        "temperature": 0,
    }
    httpx.post(f"{api_url}/chat/completions", json=body, timeout=300).raise_for_status()


def copy_store(store: BlockStore, root: Path, model_id: str) -> BlockStore:
    """The same blocks under another model id: a transfer the worker has never seen."""
    target = root / model_id
    shutil.copytree(store.root, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["model_id"] = model_id
    (target / MANIFEST).write_text(json.dumps(manifest))
    return BlockStore(target)


MODEL_CODE = """
import sys, psutil, torch
import tiktrue.service.service_runner
from tiktrue.model.store import BlockStore
store = BlockStore(sys.argv[1])
before = psutil.Process().memory_info().rss
from transformers import AutoModelForCausalLM
with torch.device("meta"):
    AutoModelForCausalLM.from_config(store.config())
print(psutil.Process().memory_info().rss - before)
"""


def model_code_bytes(store_root: Path) -> int:
    """RSS that importing and building (on the meta device) the model classes adds."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", MODEL_CODE, str(store_root)], capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def config_model(home: Path) -> str:
    return read_config(config_path(home, NETWORK_ID)).model_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-network-", dir=data_dir()))
    home = scratch / "admin"
    home.mkdir()
    # reuse the downloaded demo model: the repository is imported from the shared cache
    cluster = start_demo_network(home, log=print)
    idle = LocalCluster([scratch / "idle"], gateway=False).start()
    try:
        chat(cluster.api_url)
        status = asyncio.run(network_status(home, NETWORK_ID))
        credentials = NetworkCredentials.load(home, NETWORK_ID)
        idle_info = json.loads(run_file(scratch / "idle").read_text())
        idle_entry = NodeEntry(
            node_id=idle_info["node_id"],
            port=1,
            control_port=int(idle_info["control"].split(":")[1]),
        )
        # like every node of the network, the idle one is probed (the planner's speed test)
        idle_rss = asyncio.run(node_report(idle_entry, None, probe=True))["rss_bytes"]
        baseline = idle_rss + model_code_bytes(home / "models" / config_model(home))
        config = read_config(config_path(home, NETWORK_ID))
        lines = [
            "SmolLM2-135M-Instruct fp32 on 3 node processes (demo network, 700 MB RAM cap each), "
            "after a 48-token chat",
            "",
            f"runtime baseline: {baseline / 1e6:.0f} MB = a node service holding no blocks "
            f"(after the planner's speed probe) {idle_rss / 1e6:.0f} MB + the model code a "
            f"serving node imports (transformers classes, no weights) "
            f"{(baseline - idle_rss) / 1e6:.0f} MB",
            "",
            "| node | role | span | blocks MB | KV budget MB | RSS MB | budget MB | within |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for node in status["nodes"]:
            report = asyncio.run(node_report(config.node(node["node_id"]), credentials))
            net = report["networks"][NETWORK_ID]
            budget = net["weights_bytes"] + net["kv_budget_bytes"] + baseline
            span = f"{node['blocks'][0]}..{node['blocks'][-1]}"
            lines.append(
                f"| {node['node_id']} | {node['role']} | {span} | {net['weights_bytes'] / 1e6:.0f} "
                f"| {net['kv_budget_bytes'] / 1e6:.0f} | {report['rss_bytes'] / 1e6:.0f} "
                f"| {budget / 1e6:.0f} | {'yes' if report['rss_bytes'] <= budget else 'NO'} |"
            )
        worker = config.chain()[1]
        store = BlockStore(home / "models" / config.model_id)
        copy = copy_store(store, home / "models", "bench-transfer-copy")
        began = time.perf_counter()
        sent = asyncio.run(
            push_blocks(home, NETWORK_ID, copy, worker, list(copy.manifest.model_chain_order))
        )
        seconds = time.perf_counter() - began
        total = sum(sent.values())
        lines += [
            "",
            f"Block transfer admin -> worker over loopback: {total / 1e6:.0f} MB in "
            f"{seconds:.1f} s = {total / 1e6 / seconds:.0f} MB/s (TLS 1.3, AES-256-GCM per "
            "4 MiB chunk, sha256 per chunk and per block, written to disk)",
        ]
        print("\n".join(lines))
        if not args.no_record:
            append("Network: worker memory and block transfer (bench/network.py)", lines)
    finally:
        idle.stop()
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
