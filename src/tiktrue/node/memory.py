"""Give freed heap memory back to the OS.

Receiving blocks passes hundreds of MB through short-lived 4 MiB buffers on worker threads;
glibc keeps such memory in per-thread arenas, where it would count against the node's RAM
cap long after use. ``malloc_trim`` returns it. Elsewhere (Windows, macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _load_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _load_trim()


def release_free_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)
