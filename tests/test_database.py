"""The node's SQLite file: WAL, per-component schema versions, transactions, durability."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tiktrue.database import Database, DatabaseError, database_path

NOTES = [["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"]]


def test_one_file_in_wal_mode(tmp_path):
    db = Database.open(tmp_path)
    assert db.path == database_path(tmp_path) == tmp_path / "tiktrue.db"
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"


def test_each_component_migrates_on_its_own_and_only_once(tmp_path):
    db = Database.open(tmp_path)
    assert db.migrate("notes", NOTES) == 1
    assert db.migrate("notes", NOTES) == 1  # again: nothing to do (the table exists)
    assert db.migrate("keys", [["CREATE TABLE keys (hash TEXT PRIMARY KEY)"]]) == 1
    assert db.version("notes") == 1 and db.version("keys") == 1 and db.version("other") == 0
    db.close()
    # a later version adds a step: only that step runs, the rows stay
    db = Database.open(tmp_path)
    with db.transaction() as conn:
        conn.execute("INSERT INTO notes (body) VALUES ('kept')")
    later = [*NOTES, ["ALTER TABLE notes ADD COLUMN tag TEXT"]]
    assert db.migrate("notes", later) == 2
    assert [tuple(r) for r in db.query("SELECT body, tag FROM notes")] == [("kept", None)]


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    db = Database.open(tmp_path)
    db.migrate("notes", [*NOTES, ["CREATE TABLE more (x)"]])
    with pytest.raises(DatabaseError, match="newer version"):
        db.migrate("notes", NOTES)


def test_a_failed_transaction_leaves_nothing(tmp_path):
    db = Database.open(tmp_path)
    db.migrate("notes", NOTES)
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("INSERT INTO notes (body) VALUES ('half')")
        raise RuntimeError("in the middle")
    assert db.query("SELECT count(*) FROM notes")[0][0] == 0
    with pytest.raises(DatabaseError):  # a failed migration step is rolled back too
        try:
            db.migrate("broken", [["CREATE TABLE ok (x)", "NOT SQL"]])
        except Exception as exc:
            raise DatabaseError(str(exc)) from exc
    assert db.version("broken") == 0
    assert not db.query("SELECT name FROM sqlite_master WHERE name = 'ok'")


def test_a_commit_survives_the_process_being_killed(tmp_path):
    """The writer exits without closing anything (as a killed process would)."""
    script = textwrap.dedent(
        f"""
        import os
        from tiktrue.database import Database
        db = Database.open({str(tmp_path)!r})
        db.migrate("notes", {NOTES!r})
        with db.transaction() as conn:
            conn.execute("INSERT INTO notes (body) VALUES ('durable')")
        os._exit(9)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 9
    db = Database.open(tmp_path)
    assert [r["body"] for r in db.query("SELECT body FROM notes")] == ["durable"]
