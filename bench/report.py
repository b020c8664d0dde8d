"""Shared by the benchmark scripts: describe the machine, append results to docs/benchmarks.md."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {psutil.cpu_count(logical=True)} logical cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def _load() -> str:
    """Other processes on a shared machine slow every figure: say how busy it was."""
    try:
        return ", ".join(f"{x:.1f}" for x in psutil.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def append(title: str, lines: list[str]) -> None:
    """Append a dated section with the exact command that produced it."""
    command = " ".join([Path(sys.executable).name, *sys.argv])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"## {title}",
        "",
        f"- when: {stamp}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- load average (1, 5, 15 min) when it ended: {_load()}",
        "",
        *lines,
        "",
    ]
    with BENCHMARKS.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(section) + "\n")
    print(f"appended to {BENCHMARKS}")
