"""Progress lines for long transfers, printed a few times per transfer rather than per chunk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def progress_printer(
    log: Callable[[str], None],
    line: Callable[[Any], str],
    *,
    steps: int = 10,
    done: str = "done_bytes",
    per: str | None = None,
) -> Callable[[Any], None]:
    """A progress callback that logs ``line(p)`` each time the transfer passes another
    1/``steps`` of ``p.total_bytes`` (counted by ``p.<done>``), separately per ``p.<per>``."""
    shown: dict[Any, int] = {}

    def progress(p) -> None:
        step = int(getattr(p, done) * steps / max(p.total_bytes, 1))
        key = getattr(p, per) if per else None
        if shown.get(key) != step:
            shown[key] = step
            log(line(p))

    return progress
