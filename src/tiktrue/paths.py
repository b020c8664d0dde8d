"""Where TikTrue keeps its data: ``TIKTRUE_HOME`` when set, else the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

HOME_ENV = "TIKTRUE_HOME"


def write_text_atomic(path: Path, text: str) -> None:
    """Write next to ``path``, then rename over it: readers never see half a file."""
    partial = Path(path).with_suffix(Path(path).suffix + ".partial")
    partial.write_text(text, "utf-8")
    partial.replace(path)


def data_dir() -> Path:
    """The data directory, created on first use."""
    configured = os.environ.get(HOME_ENV)
    path = Path(configured).expanduser() if configured else Path(user_data_dir("tiktrue", False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Block stores live in ``<data>/models/<model_id>/``."""
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Downloads and spilled KV pages; safe to delete."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_file(data_dir: Path) -> Path:
    """Where a running node service says where it listens (``<data>/run/node.json``)."""
    return Path(data_dir) / "run" / "node.json"


def log_dir(data_dir: Path) -> Path:
    """The node's logs: ``<data>/logs`` (``node.log`` rotated, ``events.jsonl``)."""
    path = Path(data_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
