"""Where the UI's own files are: ``STATIC_DIR`` (the Persian font), served at ``STATIC_PATH``.

A module of its own: the page layout and the app that serves the files both need it, and the
app imports the pages."""

from __future__ import annotations

from pathlib import Path

STATIC_PATH = "/_tiktrue"
STATIC_DIR = Path(__file__).parent / "static"
