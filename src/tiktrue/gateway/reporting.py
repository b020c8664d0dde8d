"""A node's report for a time window, from what it keeps: the history of its gateway's answers
and of its networks' nodes, its event log (failovers), its accounts and keys (names for the
usage table) and its conversations (thumbs per model). ``tiktrue report`` and the dashboard's
Reports page both call :func:`node_report`."""

from __future__ import annotations

import time
from pathlib import Path

from tiktrue.gateway.session_store import SessionStore, ratings_by_model
from tiktrue.monitoring.history import HistoryStore
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.monitoring.reports import Report, build_report
from tiktrue.security.users import UserStore

EVENTS_READ = 20_000  # the rotated event log holds about this many at most


def account_names(users: UserStore) -> dict[str, str]:
    names = {f"user:{u.id}": u.name for u in users.list_users()}
    for key in users.list_keys():
        names[f"key:{key.id}"] = f"key {key.id} {key.name or key.prefix + '...'}"
    return names


def node_report(data_dir: Path, since: float, until: float | None = None) -> Report:
    """Blocking (SQLite, files): callers on an event loop run it in a thread."""
    until = time.time() if until is None else until
    history = HistoryStore(data_dir)
    users = UserStore(data_dir)
    sessions = SessionStore.open(data_dir)
    try:
        return build_report(
            history,
            since,
            until,
            events=recent_events(events_path(data_dir), EVENTS_READ),
            names=account_names(users),
            ratings=ratings_by_model(sessions, since, until),
        )
    finally:
        history.close()
        users.close()
        sessions.db.close()
