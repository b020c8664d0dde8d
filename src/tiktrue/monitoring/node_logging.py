"""The node's own log: every record of the node process (TikTrue's, and the libraries'
warnings) also goes to ``<data>/logs/node.log``, rotated by size, so that a PC's recent lines
can be read after the fact, by the admin over the control channel (op ``logs``, members only)
or by the ``collect_logs`` task, and not only where its stderr went."""

from __future__ import annotations

import logging
from collections import deque
from logging.handlers import RotatingFileHandler
from pathlib import Path

from tiktrue.paths import log_dir

LOG_FILE = "node.log"
MAX_BYTES = 5 << 20  # per file; with BACKUPS old ones, at most ~30 MiB
BACKUPS = 5
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
MAX_LINES = 2000  # the most lines one request reads back
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def node_log_path(data_dir: Path) -> Path:
    return log_dir(data_dir) / LOG_FILE


def setup_node_logging(data_dir: Path) -> Path:
    """Add the rotated file to the root logger (once per file); returns its path."""
    path = node_log_path(data_dir)
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, RotatingFileHandler) and Path(handler.baseFilename) == path:
            return path
    handler = RotatingFileHandler(
        path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8", delay=True
    )
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    return path


def tail_log(data_dir: Path, lines: int = 200, level: str | None = None) -> list[str]:
    """The last ``lines`` lines of the node's log (from the rotated files when the current
    one has fewer), oldest first; ``level``: only records at that level or above (a record's
    continuation lines, a traceback, stay with it)."""
    lines = max(1, min(int(lines), MAX_LINES))
    if level is not None and level.upper() not in LEVELS:
        raise ValueError(f"level is one of {', '.join(LEVELS)}, not {level!r}")
    wanted = set(LEVELS[LEVELS.index(level.upper()) :]) if level else None
    path = node_log_path(data_dir)
    files = [path.with_name(f"{path.name}.{i}") for i in range(BACKUPS, 0, -1)] + [path]
    kept: deque[str] = deque(maxlen=lines)
    keep_record = True
    for file in files:
        if not file.is_file():
            continue
        with file.open("r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.rstrip("\n")
                parts = line.split(" ", 4)
                if len(parts) >= 4 and parts[3] in LEVELS:  # a record's first line
                    keep_record = wanted is None or parts[3] in wanted
                if keep_record:
                    kept.append(line)
    return list(kept)
