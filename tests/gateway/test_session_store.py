"""The gateway's session store on its own: what a restart finds, closed and live flags,
saved sessions, several networks and threads."""

from __future__ import annotations

import threading

from tiktrue.database import Database
from tiktrue.gateway.session_store import MIGRATIONS, SessionStore

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_a_session_comes_back_as_it_was_put(tmp_path):
    store = SessionStore.open(tmp_path)
    store.put("net", "s1", [1, 2, 3], [4], CHAT)
    store.db.close()
    again = SessionStore.open(tmp_path).get("net", "s1")  # a new process would see this
    assert (again.tokens, again.unfed, again.messages) == ([1, 2, 3], [4], CHAT)
    assert again.live and not again.closed and again.owner is None
    assert again.created_at <= again.updated_at
    assert SessionStore.open(tmp_path).get("net", "nope") is None
    assert SessionStore.open(tmp_path).get("othernet", "s1") is None  # per network


def test_a_later_turn_updates_the_session_and_keeps_its_creation(tmp_path):
    store = SessionStore.open(tmp_path)
    store.put("net", "s1", [1], [], [], owner="ann")
    first = store.get("net", "s1")
    store.put("net", "s1", [1, 2, 3], [9], CHAT)
    later = store.get("net", "s1")
    assert later.tokens == [1, 2, 3] and later.unfed == [9] and later.messages == CHAT
    assert later.created_at == first.created_at and later.updated_at >= first.updated_at
    assert later.owner == "ann"  # a turn without an owner does not clear it


def test_closing_keeps_the_history_and_a_new_turn_starts_a_new_conversation(tmp_path):
    store = SessionStore.open(tmp_path)
    store.put("net", "s1", [1, 2], [], CHAT)
    created = store.get("net", "s1").created_at
    store.close("net", "s1")
    closed = store.get("net", "s1")
    assert closed.closed and not closed.live and closed.tokens == [1, 2]
    assert [s.session_id for s in store.list("net")] == []
    assert [s.session_id for s in store.list("net", closed=True)] == ["s1"]
    store.put("net", "s1", [7], [], [])
    reopened = store.get("net", "s1")
    assert not reopened.closed and reopened.live and reopened.created_at >= created


def test_live_sessions_are_those_the_nodes_may_hold(tmp_path):
    store = SessionStore.open(tmp_path)
    for sid in ("a", "b", "c"):
        store.put("net", sid, [1], [], [])
    store.put("other", "d", [1], [], [])
    store.set_live("net", ["b"], False)
    store.close("net", "c")
    assert sorted(store.live_sessions("net")) == ["a"]
    store.set_live("net", [], False)  # nothing to do
    assert store.live_sessions("other") == ["d"]


def test_a_saved_session_outlives_closing_and_a_later_turn(tmp_path):
    store = SessionStore.open(tmp_path)
    store.put("net", "s1", [1, 2], [3], CHAT)
    store.save("net", "s1", [1, 2], [3], CHAT)
    store.put("net", "s1", [1, 2, 3, 4], [], [*CHAT, {"role": "user", "content": "more"}])
    store.close("net", "s1")
    saved = store.saved("net", "s1")
    assert (saved.tokens, saved.unfed, saved.messages) == ([1, 2], [3], CHAT)
    assert store.saved("net", "never") is None
    store.delete("net", "s1")
    assert store.get("net", "s1") is None and store.saved("net", "s1") is None


def test_list_is_most_recent_first(tmp_path):
    store = SessionStore.open(tmp_path)
    for sid in ("old", "mid", "new"):
        store.put("net", sid, [1], [], [])
    store.put("net", "old", [1, 2], [], [])  # used again: now the most recent
    assert [s.session_id for s in store.list("net")] == ["old", "new", "mid"]


def test_stores_share_one_file_and_threads_share_one_store(tmp_path):
    db = Database.open(tmp_path)
    store = SessionStore(db)
    db.migrate("accounts", [["CREATE TABLE accounts (name TEXT PRIMARY KEY)"]])
    assert SessionStore(db).get("net", "x") is None  # migrating again is harmless

    def writer(n: int) -> None:
        for i in range(25):
            store.put("net", f"t{n}-{i}", list(range(i)), [], [])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.list("net")) == 100
    assert store.get("net", "t3-24").tokens == list(range(24))
    assert db.version("sessions") == len(MIGRATIONS) and db.version("accounts") == 1


def test_a_session_that_never_completed_a_turn_is_forgotten_once_freed(tmp_path):
    store = SessionStore.open(tmp_path)
    store.put("net", "empty", [], [], [])  # opened on the nodes, no answer yet
    store.put("net", "full", [1], [], [])
    assert sorted(store.live_sessions("net")) == ["empty", "full"]
    store.set_live("net", ["empty", "full"], False)
    assert store.get("net", "empty") is None
    assert store.get("net", "full").tokens == [1]


def test_an_accounts_conversations_titles_answers_and_ratings(tmp_path):
    """The app's conversation list: one owner's open conversations over every network,
    searchable; each answer's model, speed and rating; deleting forgets them all."""
    from tiktrue.gateway.session_store import Answer

    store = SessionStore.open(tmp_path)
    store.put("net", "a", [1], [], [{"role": "user", "content": "About tulips"}], owner="u:1")
    store.put("net2", "b", [1], [], [{"role": "user", "content": "Rust lifetimes"}], owner="u:1")
    store.put("net", "c", [1], [], CHAT, owner="u:2")
    store.set_title("net", "a", "Flowers")
    assert [s.session_id for s in store.owned("u:1")] == ["b", "a"]  # newest first
    assert [s.session_id for s in store.owned("u:1", search="flow")] == ["a"]  # by title
    assert [s.session_id for s in store.owned("u:1", search="LIFETIMES")] == ["b"]  # by text
    assert store.owned("u:1", search="nothing like it") == []
    assert store.get("net", "a").title == "Flowers"
    store.close("net", "a")
    assert [s.session_id for s in store.owned("u:1")] == ["b"]  # closed ones are not listed

    store.record_answer("net2", "b", Answer(1, "tiny", 12, 30.5, 210.0, "stop"))
    store.rate("net2", "b", 1, -1)
    [answer] = store.answers("net2", "b").values()
    assert (answer.model_id, answer.tokens, answer.rating, answer.finish_reason) == (
        "tiny",
        12,
        -1,
        "stop",
    )
    store.record_answer("net2", "b", Answer(1, "tiny", 7, None, None, "cancelled"))
    assert store.answers("net2", "b")[1].rating is None  # a new answer, not yet rated
    store.delete("net2", "b")
    assert store.answers("net2", "b") == {}


def older_store(tmp_path, steps: int, messages: str = "[]", title: str | None = None):
    """A tiktrue.db made by a TikTrue that knew ``steps`` migrations, holding one
    conversation ('net', 'old') of account u:1; returns its database."""
    from tiktrue.gateway.session_store import COMPONENT

    db = Database.open(tmp_path)
    db.migrate(COMPONENT, MIGRATIONS[:steps])
    titled = ", title" if title is not None else ""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO sessions (network_id, session_id, owner, tokens, unfed, messages,"
            f" created_at, updated_at{titled}) VALUES ('net', 'old', 'u:1', '[]', '[]', ?, 1,"
            f" 1{', ?' if title is not None else ''})",
            (messages, title) if title is not None else (messages,),
        )
    return db


def test_an_older_store_gains_titles_and_answers(tmp_path):
    """A tiktrue.db made before titles and answers existed is migrated, its rows kept."""
    from tiktrue.gateway.session_store import COMPONENT

    db = older_store(tmp_path, 1)
    store = SessionStore(db)
    assert db.version(COMPONENT) == len(MIGRATIONS)
    [old] = store.owned("u:1")
    assert old.session_id == "old" and old.title is None


PERSIAN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "پایتخت ایران کجاست؟"},
    {"role": "assistant", "content": "تهران پایتخت ایران است."},
]


def test_search_finds_persian_words_and_only_the_conversations_words(tmp_path):
    """Non-ASCII text is found (the JSON of the messages escapes it), case folds in every
    script, and neither the JSON's keys nor the system prompt match every conversation."""
    store = SessionStore.open(tmp_path)
    store.put("net", "fa", [1], [], PERSIAN, owner="u:1")
    store.put("net", "de", [1], [], [{"role": "user", "content": "Die STRASSE"}], owner="u:1")
    store.set_title("net", "de", "Größe")

    def found(text: str) -> list[str]:
        return sorted(s.session_id for s in store.owned("u:1", search=text))

    assert found("تهران") == ["fa"]  # in the answer
    assert found("  ایران   کجاست ") == ["fa"]  # spaces as typed
    assert found("straße") == ["de"] and found("GRÖSSE") == ["de"]  # Unicode case folding
    assert found("content") == [] and found("assistant") == []  # JSON keys and roles
    assert found("briefly") == []  # the system prompt
    assert found("") == ["de", "fa"]
    [row] = store.db.query("SELECT messages FROM sessions WHERE session_id = 'fa'")
    assert "تهران" in row["messages"]  # stored as written, not as \\uXXXX escapes


def test_conversations_stored_before_search_text_are_found(tmp_path):
    """Migration 3 indexes the rows already there (their JSON escapes non-ASCII text)."""
    import json

    store = SessionStore(older_store(tmp_path, 2, json.dumps(PERSIAN), title="Geography"))
    assert [s.session_id for s in store.owned("u:1", search="تهران")] == ["old"]
    assert [s.session_id for s in store.owned("u:1", search="geography")] == ["old"]
    assert store.get("net", "old").messages == PERSIAN
