"""The gateway's conversations and session histories, kept in the node's SQLite file so that a
restart of the gateway's node loses nothing: the next turn finds the history here and the
chain rebuilds its caches by replaying it.

Two tables, per network and session id:

- ``sessions``: what the chain's caches hold (``tokens``), the tokens sampled last and not yet
  fed (``unfed``), the chat messages, the owner (accounts come later), times, ``closed`` (the
  conversation ended: a later turn with that id starts afresh) and ``live`` (the nodes may
  hold its KV: freed at start-up after a restart, and when the session idles out);
- ``saved_sessions``: the gateway's half of ``session_save`` (the nodes keep their KV files),
  read back by ``session_restore``, also after ``session_close``;
- ``answers``: per assistant message of a conversation (its index in ``messages``), which
  model answered, how fast (tokens/s, time to first token) and the person's rating (thumbs
  up 1, down -1). A conversation's ``title`` is what the app's conversation list shows.

Searching conversations reads ``search_text``: the title and the words of the person's and
the model's messages, case-folded in Python (SQLite's ``lower`` and ``LIKE`` fold ASCII only,
and the JSON of ``messages`` escapes every non-ASCII character: Persian text would never be
found there, and every conversation would match "content").

The app's conversations and the API's sessions are the same rows: one store.

Every call is one short transaction; callers on the event loop use ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue.database import Database

COMPONENT = "sessions"
MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE sessions ("
        " network_id TEXT NOT NULL,"
        " session_id TEXT NOT NULL,"
        " owner TEXT,"
        " tokens TEXT NOT NULL,"
        " unfed TEXT NOT NULL,"
        " messages TEXT NOT NULL,"
        " created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL,"
        " closed INTEGER NOT NULL DEFAULT 0,"
        " live INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (network_id, session_id))",
        "CREATE INDEX sessions_live ON sessions (network_id, live)",
        "CREATE TABLE saved_sessions ("
        " network_id TEXT NOT NULL,"
        " session_id TEXT NOT NULL,"
        " tokens TEXT NOT NULL,"
        " unfed TEXT NOT NULL,"
        " messages TEXT NOT NULL,"
        " saved_at REAL NOT NULL,"
        " PRIMARY KEY (network_id, session_id))",
    ],
    [
        "ALTER TABLE sessions ADD COLUMN title TEXT",
        "CREATE INDEX sessions_owner ON sessions (owner, updated_at)",
        "CREATE TABLE answers ("
        " network_id TEXT NOT NULL,"
        " session_id TEXT NOT NULL,"
        " message_index INTEGER NOT NULL,"
        " model_id TEXT NOT NULL,"
        " tokens INTEGER NOT NULL,"
        " tokens_per_s REAL,"
        " first_token_ms REAL,"
        " finish_reason TEXT,"
        " rating INTEGER,"
        " created_at REAL NOT NULL,"
        " PRIMARY KEY (network_id, session_id, message_index))",
    ],
    [
        "ALTER TABLE sessions ADD COLUMN search_text TEXT NOT NULL DEFAULT ''",
        lambda conn: _index_all(conn),
    ],
]


@dataclass
class StoredSession:
    network_id: str
    session_id: str
    tokens: list[int] = field(default_factory=list)
    unfed: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    owner: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    closed: bool = False
    live: bool = False
    title: str | None = None


@dataclass
class Answer:
    """Who answered one assistant message, how fast, and how the person rated it."""

    message_index: int
    model_id: str
    tokens: int
    tokens_per_s: float | None
    first_token_ms: float | None
    finish_reason: str | None = None  # stop, length, cancelled (the person stopped it)
    rating: int | None = None


@dataclass
class SavedSession:
    """The gateway's part of a ``session_save``: the history the saved KV files hold."""

    tokens: list[int]
    unfed: list[int]
    messages: list[dict]
    saved_at: float


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(COMPONENT, MIGRATIONS)

    @classmethod
    def open(cls, data_dir: Path) -> SessionStore:
        """The store in ``<data>/tiktrue.db`` (a connection of its own)."""
        return cls(Database.open(data_dir))

    def get(self, network_id: str, session_id: str) -> StoredSession | None:
        rows = self.db.query(
            "SELECT * FROM sessions WHERE network_id = ? AND session_id = ?",
            (network_id, session_id),
        )
        return _session(rows[0]) if rows else None

    def put(
        self,
        network_id: str,
        session_id: str,
        tokens: list[int],
        unfed: list[int],
        messages: list[dict],
        *,
        owner: str | None = None,
    ) -> None:
        """The session after an answer: open, and held by the chain's nodes. A session that
        was closed starts a new conversation (new creation time)."""
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO sessions (network_id, session_id, owner, tokens, unfed, messages,"
                " created_at, updated_at, closed, live) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 1)"
                " ON CONFLICT (network_id, session_id) DO UPDATE SET"
                " owner = COALESCE(excluded.owner, sessions.owner),"
                " tokens = excluded.tokens, unfed = excluded.unfed,"
                " messages = excluded.messages,"
                " created_at = CASE WHEN sessions.closed THEN excluded.created_at"
                " ELSE sessions.created_at END,"
                " updated_at = excluded.updated_at, closed = 0, live = 1",
                (
                    network_id,
                    session_id,
                    owner,
                    json.dumps(tokens),
                    json.dumps(unfed),
                    _json(messages),
                    now,
                    now,
                ),
            )
            _index(conn, network_id, session_id)

    def set_live(self, network_id: str, session_ids: Iterable[str], live: bool) -> None:
        """Whether the nodes may hold these sessions. One that the nodes no longer hold and
        that never completed a turn (an answer without a session, a first turn that failed)
        holds nothing worth keeping: it is forgotten."""
        ids = [(network_id, sid) for sid in session_ids]
        if not ids:
            return
        with self.db.transaction() as conn:
            conn.executemany(
                f"UPDATE sessions SET live = {int(live)} WHERE network_id = ? AND session_id = ?",
                ids,
            )
            if not live:
                conn.executemany(
                    "DELETE FROM sessions WHERE network_id = ? AND session_id = ?"
                    " AND tokens = '[]' AND unfed = '[]' AND messages = '[]'",
                    ids,
                )

    def live_sessions(self, network_id: str) -> list[str]:
        """Sessions the nodes may still hold (from before a restart of this gateway)."""
        rows = self.db.query(
            "SELECT session_id FROM sessions WHERE network_id = ? AND live = 1", (network_id,)
        )
        return [row["session_id"] for row in rows]

    def close(self, network_id: str, session_id: str) -> None:
        """The conversation ended: its history stays (closed), the nodes hold nothing."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE sessions SET closed = 1, live = 0, updated_at = ?"
                " WHERE network_id = ? AND session_id = ?",
                (time.time(), network_id, session_id),
            )

    def delete(self, network_id: str, session_id: str) -> None:
        with self.db.transaction() as conn:
            key = (network_id, session_id)
            conn.execute("DELETE FROM sessions WHERE network_id = ? AND session_id = ?", key)
            conn.execute("DELETE FROM saved_sessions WHERE network_id = ? AND session_id = ?", key)
            conn.execute("DELETE FROM answers WHERE network_id = ? AND session_id = ?", key)

    def list(self, network_id: str, *, closed: bool = False) -> list[StoredSession]:
        """The network's conversations, most recently used first (closed ones when asked)."""
        rows = self.db.query(
            "SELECT * FROM sessions WHERE network_id = ? AND (closed = 0 OR ?)"
            " ORDER BY updated_at DESC",
            (network_id, int(closed)),
        )
        return [_session(row) for row in rows]

    def owned(self, owner: str, *, search: str = "", limit: int = 200) -> list[StoredSession]:
        """An account's open conversations over every network, most recent first; ``search``
        keeps those whose title or messages contain it (case-insensitive, any script)."""
        rows = self.db.query(
            "SELECT * FROM sessions WHERE owner = ? AND closed = 0"
            " AND instr(search_text, ?) > 0 ORDER BY updated_at DESC LIMIT ?",
            (owner, _fold(search.strip()), limit),
        )
        return [_session(row) for row in rows]

    def set_title(self, network_id: str, session_id: str, title: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE sessions SET title = ? WHERE network_id = ? AND session_id = ?",
                (title, network_id, session_id),
            )
            _index(conn, network_id, session_id)

    def record_answer(self, network_id: str, session_id: str, answer: Answer) -> None:
        """Who answered message ``answer.message_index`` and how fast (a regenerated answer
        replaces the one it replaces, rating cleared)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO answers (network_id, session_id, message_index,"
                " model_id, tokens, tokens_per_s, first_token_ms, finish_reason, rating,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (
                    network_id,
                    session_id,
                    answer.message_index,
                    answer.model_id,
                    answer.tokens,
                    answer.tokens_per_s,
                    answer.first_token_ms,
                    answer.finish_reason,
                    time.time(),
                ),
            )

    def rate(self, network_id: str, session_id: str, message_index: int, rating: int | None):
        """Thumbs up (1), down (-1) or neither (None) for one answer."""
        if rating not in (1, -1, None):
            raise ValueError("a rating is 1 (thumbs up), -1 (thumbs down) or None")
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE answers SET rating = ?"
                " WHERE network_id = ? AND session_id = ? AND message_index = ?",
                (rating, network_id, session_id, message_index),
            )

    def answers(self, network_id: str, session_id: str) -> dict[int, Answer]:
        rows = self.db.query(
            "SELECT * FROM answers WHERE network_id = ? AND session_id = ?",
            (network_id, session_id),
        )
        return {
            row["message_index"]: Answer(
                row["message_index"],
                row["model_id"],
                row["tokens"],
                row["tokens_per_s"],
                row["first_token_ms"],
                row["finish_reason"],
                row["rating"],
            )
            for row in rows
        }

    # --- session_save / session_restore ------------------------------------------------------

    def save(
        self,
        network_id: str,
        session_id: str,
        tokens: list[int],
        unfed: list[int],
        messages: list[dict],
    ) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO saved_sessions"
                " (network_id, session_id, tokens, unfed, messages, saved_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    network_id,
                    session_id,
                    json.dumps(tokens),
                    json.dumps(unfed),
                    _json(messages),
                    time.time(),
                ),
            )

    def saved(self, network_id: str, session_id: str) -> SavedSession | None:
        rows = self.db.query(
            "SELECT * FROM saved_sessions WHERE network_id = ? AND session_id = ?",
            (network_id, session_id),
        )
        if not rows:
            return None
        row = rows[0]
        return SavedSession(
            tokens=json.loads(row["tokens"]),
            unfed=json.loads(row["unfed"]),
            messages=json.loads(row["messages"]),
            saved_at=row["saved_at"],
        )


def _json(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False)  # Persian stays readable (and 3x smaller)


def _fold(text: str) -> str:
    """Text as search compares it: Unicode case folding (``"Straße"`` finds ``"STRASSE"``)."""
    return " ".join(text.casefold().split())


def _search_text(title: str | None, messages_json: str) -> str:
    """What a search looks in: the title and the person's and the model's words (not the
    system prompt, which would make every conversation match it, nor the JSON's keys)."""
    try:
        messages = json.loads(messages_json)
    except ValueError:
        messages = []
    words = [
        m.get("content") or ""
        for m in messages
        if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]
    return _fold("\n".join([title or "", *(w for w in words if isinstance(w, str))]))


def _index(conn, network_id: str, session_id: str) -> None:
    """Bring one conversation's ``search_text`` up to date (inside the caller's transaction)."""
    row = conn.execute(
        "SELECT title, messages FROM sessions WHERE network_id = ? AND session_id = ?",
        (network_id, session_id),
    ).fetchone()
    if row is not None:
        conn.execute(
            "UPDATE sessions SET search_text = ? WHERE network_id = ? AND session_id = ?",
            (_search_text(row["title"], row["messages"]), network_id, session_id),
        )


def _index_all(conn) -> None:
    """Migration 3: the ``search_text`` of the conversations stored before it existed."""
    rows = conn.execute("SELECT network_id, session_id FROM sessions").fetchall()
    for row in rows:
        _index(conn, row["network_id"], row["session_id"])


def _session(row) -> StoredSession:
    return StoredSession(
        network_id=row["network_id"],
        session_id=row["session_id"],
        tokens=json.loads(row["tokens"]),
        unfed=json.loads(row["unfed"]),
        messages=json.loads(row["messages"]),
        owner=row["owner"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        closed=bool(row["closed"]),
        live=bool(row["live"]),
        title=row["title"],
    )


def ratings_by_model(store: SessionStore, since: float, until: float) -> dict[str, tuple[int, int]]:
    """Model -> (thumbs up, thumbs down) of the answers given in [since, until) (reports)."""
    rows = store.db.query(
        "SELECT model_id, SUM(rating = 1) AS up, SUM(rating = -1) AS down FROM answers"
        " WHERE created_at >= ? AND created_at < ? AND rating IS NOT NULL GROUP BY model_id",
        (since, until),
    )
    return {row["model_id"]: (int(row["up"] or 0), int(row["down"] or 0)) for row in rows}
