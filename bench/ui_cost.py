"""What the web UI (NiceGUI) costs a node that runs a gateway: start-up time and memory.

    python bench/ui_cost.py [--rounds 5] [--no-record]

Each round starts ``tiktrue node --api-port 0`` twice on fresh data dirs, once with the web UI
(``--ui``, the default) and once without (``--no-ui``), in alternating order, and measures:
the time from spawning the process until it says where it listens (``<data>/run/node.json``,
written once the API answers), its RSS then, and its RSS after it served its first page (the
welcome page with the UI; ``/health`` without). NiceGUI is imported only by a node serving
the UI, so nodes without a gateway (most workers) never pay for it. The figures are medians;
the difference between the two modes is what the UI costs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from report import append
from tiktrue.service.local_network import LocalCluster

IMPORT_NICEGUI = (
    "import time; t = time.perf_counter(); import nicegui; print(time.perf_counter() - t)"
)


def start_once(ui: bool) -> dict:
    """One node start on a fresh data dir; its figures."""
    with tempfile.TemporaryDirectory(prefix="tiktrue-ui-cost-") as tmp:
        cluster = LocalCluster([Path(tmp) / "node"], gateway_args=["--ui" if ui else "--no-ui"])
        began = time.perf_counter()
        cluster.start()
        try:
            started_s = time.perf_counter() - began
            process = psutil.Process(cluster.processes[0].pid)
            rss_started = process.memory_info().rss
            base = cluster.api_url.removesuffix("/v1")
            page = httpx.get(f"{base}/welcome" if ui else f"{base}/health", timeout=120)
            page.raise_for_status()
            assert ("Welcome to TikTrue" in page.text) if ui else True, page.text[:200]
            rss_page = process.memory_info().rss
        finally:
            cluster.stop()
    return {"start_s": started_s, "rss_started": rss_started, "rss_page": rss_page}


def import_seconds() -> float:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_NICEGUI], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(args.rounds):
        for ui in (True, False) if i % 2 == 0 else (False, True):
            runs[ui].append(start_once(ui))
            print(f"round {i + 1}, {'ui' if ui else 'no-ui'}: {runs[ui][-1]}", flush=True)
    imports = [import_seconds() for _ in range(args.rounds)]

    def median(ui: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[ui])

    mib = 1 << 20
    lines = [
        f"`tiktrue node --api-port 0` on a fresh data dir, {args.rounds} starts per mode "
        "(alternating); medians",
        "",
        "| | start-up (spawn to listening) | RSS when started | RSS after the first page |",
        "|---|---|---|---|",
    ]
    for ui, name in ((False, "`--no-ui`"), (True, "`--ui` (default)")):
        lines.append(
            f"| {name} | {median(ui, 'start_s'):.2f} s | {median(ui, 'rss_started') / mib:.0f} MiB"
            f" | {median(ui, 'rss_page') / mib:.0f} MiB |"
        )
    lines += [
        f"| the UI's cost | +{median(True, 'start_s') - median(False, 'start_s'):.2f} s "
        f"(x{median(True, 'start_s') / median(False, 'start_s'):.2f})"
        f" | +{(median(True, 'rss_started') - median(False, 'rss_started')) / mib:.0f} MiB"
        f" | +{(median(True, 'rss_page') - median(False, 'rss_page')) / mib:.0f} MiB |",
        "",
        f"- `import nicegui` alone in a fresh interpreter: median "
        f"{statistics.median(imports):.2f} s",
        "- NiceGUI is imported only where the UI is served (a node with `--api-port` and the "
        "UI on); workers without a gateway never import it",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append("The web UI's cost on a gateway node (bench/ui_cost.py)", lines)


if __name__ == "__main__":
    main()
