"""The node's embedded database: one SQLite file, ``<data>/tiktrue.db``, shared by every store
of the node (the gateway's conversations and sessions; later accounts and API keys).

WAL mode, so readers never wait for a writer and a committed transaction survives the process
being killed. Each store owns its tables and brings them up to date with ``migrate``: its own
numbered steps, recorded per component in ``schema_version``, so stores added later never
renumber the others' steps. One connection per ``Database``, used by one thread at a time
(callers on an event loop run the short transactions through ``asyncio.to_thread``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

DB_NAME = "tiktrue.db"
Statement = str | Callable[[sqlite3.Connection], None]  # one part of a migration step


class DatabaseError(Exception):
    """The database cannot be used as it is (made by a newer version, unreadable)."""

    code = "database_error"


def database_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_NAME


class Database:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: no implicit transactions; ``transaction`` opens them
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a crash
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"cannot open the database {self.path}: {exc}") from exc

    @classmethod
    def open(cls, data_dir: Path) -> Database:
        return cls(database_path(data_dir))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: it takes the write lock at once, so two
        processes never deadlock upgrading a read)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def version(self, component: str) -> int:
        rows = self.query("SELECT version FROM schema_version WHERE component = ?", (component,))
        return rows[0]["version"] if rows else 0

    def migrate(self, component: str, steps: Sequence[Sequence[Statement]]) -> int:
        """Apply ``steps[version:]`` (each a list of SQL statements, or of functions given the
        connection, for what SQL alone cannot compute) in one transaction; returns the
        component's version. A database from a newer version is refused."""
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT version FROM schema_version WHERE component = ?", (component,)
            ).fetchone()
            current = row["version"] if row else 0
            if current > len(steps):
                raise DatabaseError(
                    f"{self.path}: the {component} tables are at version {current}; this "
                    f"TikTrue knows {len(steps)} (the database was made by a newer version)"
                )
            for step in steps[current:]:
                for statement in step:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (component, version) VALUES (?, ?)"
                " ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, len(steps)),
            )
        return len(steps)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
