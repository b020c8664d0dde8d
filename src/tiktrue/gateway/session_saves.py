"""Saving a conversation where it stands and restoring it later, without computing its prompt
again: every node saves (and loads) its layers' KV cache, the gateway its history (the store,
with its owner). Only the owner saves or restores a conversation."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

from tiktrue.gateway.errors import ChainError
from tiktrue.gateway.session_registry import SessionRegistry, check_owner
from tiktrue.gateway.session_store import SavedSession
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol import protocol_spec as ps


class SessionSaves:
    """Saves and restores of one network's sessions (``sessions``: the gateway's registry)."""

    def __init__(self, sessions: SessionRegistry) -> None:
        self.sessions = sessions

    def _session_dir(self, session_id: str) -> Path:
        return self.sessions.data_dir / "sessions" / self.sessions.network_id / session_id

    async def save(self, session_id: str, owner: str | None = None) -> Path:
        """Every node saves its layers' KV cache; the gateway saves the history (store), with
        its owner. Another's session is refused, open or closed; a closed one is not found."""
        state = self.sessions.get(session_id)
        if state is not None and state.ready:
            check_owner(state.owner, owner, session_id)
        else:
            stored = await self.sessions.check_stored_owner(session_id, owner)
            if stored is None or stored.closed:
                raise ChainError(ps.SESSION_NOT_FOUND, f"no open session {session_id}")
        state = await self.sessions.acquire(session_id, True, owner)
        try:
            await self.sessions.chain.rebuild(
                session_id, len(state.tokens)
            )  # loaded from the store
            await self.sessions.chain.control(ps.SessionSave, session_id)
            save = functools.partial(
                self.sessions.store.save, owner=state.owner, window_start=state.window_start
            )
            await asyncio.to_thread(
                save,
                self.sessions.network_id,
                session_id,
                state.tokens,
                state.unfed,
                state.messages,
            )
        finally:
            self.sessions.release(session_id, state, True)
        return self._session_dir(session_id)

    async def restore(self, session_id: str, owner: str | None = None) -> None:
        """Load a saved session on every node; it continues without recomputing its prompt.
        Only the owner of the save restores it (and only over a session row of their own)."""
        await self.sessions.check_stored_owner(session_id, owner)  # the save and the row: theirs
        saved = await asyncio.to_thread(
            self.sessions.store.saved, self.sessions.network_id, session_id
        )
        saved = saved or self._saved_by_an_older_version(session_id)
        if saved is None:
            raise ChainError(ps.SESSION_NOT_FOUND, f"no saved session {session_id}")
        claimed = await self.sessions.claim([session_id], owner)
        if not claimed:
            raise ChainError(ps.INVALID_MESSAGE, f"session {session_id} is already open")
        state = claimed[session_id]
        try:
            try:
                await self.sessions.chain.control(ps.SessionRestore, session_id)
            except (ChainError, PeerUnavailable):  # the nodes before the failing one hold it
                await self.sessions.close_on_nodes(session_id)
                raise
            self.sessions.chain.adopt(session_id, saved.tokens, stale=False)
            state.tokens, state.unfed = list(saved.tokens), list(saved.unfed)
            state.messages, state.window_start = list(saved.messages), saved.window_start
            put = functools.partial(
                self.sessions.store.put, owner=owner, window_start=saved.window_start
            )
            await asyncio.to_thread(
                put, self.sessions.network_id, session_id, saved.tokens, saved.unfed, saved.messages
            )
        except BaseException:
            self.sessions.unclaim(claimed)
            raise
        state.ready = True
        self.sessions.release(session_id, state, True)

    def _saved_by_an_older_version(self, session_id: str) -> SavedSession | None:
        """Saves made before the store kept the gateway's part in ``gateway.json``."""
        path = self._session_dir(session_id) / "gateway.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text("utf-8"))
        return SavedSession(saved["tokens"], saved["unfed"], saved["messages"], 0.0)
