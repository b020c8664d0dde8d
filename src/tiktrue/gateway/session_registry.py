"""The gateway's sessions: which are in memory now, whose each is, and how one is loaded,
saved, restored and closed.

Sessions live in three places: in memory here (while in use), the nodes' KV caches, and the
store (``<data>/tiktrue.db``), written after every answer. A session that is not in memory
(after a restart of this node, or freed when it idled out) is loaded from the store on its
next turn and rebuilt on the nodes by replaying its history (or from its saved KV when it was
saved at exactly that point).

Locks: each session has its own, held for a turn and for anything that touches the chain or
the store on its behalf. Nothing is locked across all sessions: an id is *claimed* by
registering a state whose lock is already held (a step that awaits nothing, so no other task
runs in between), then loaded, restored or closed holding only that lock; on failure the claim
is withdrawn. Others asking for that id wait on its lock and look again. So a slow or silent
node holds up the sessions it serves, never a new conversation elsewhere (issue 16.8: while a
registry-wide lock was held across a close that waited on a frozen backup, a new conversation's
first token waited for the close's 10 s timeout).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue.gateway.chain_client import ChainClient
from tiktrue.gateway.errors import ChainError
from tiktrue.gateway.session_store import SavedSession, SessionStore, StoredSession
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol import protocol_spec as ps

log = logging.getLogger("tiktrue.gateway")

CLOSE_TIMEOUT_S = 30.0  # a close that a hung node never answers (on every chain) is given up


@dataclass
class SessionState:
    """What the chain holds for a session: ``tokens`` are in every node's KV cache."""

    tokens: list[int] = field(default_factory=list)
    unfed: list[int] = field(default_factory=list)  # sampled last, not yet run through the chain
    messages: list[dict] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cancelled: bool = False
    last_used: float = field(default_factory=time.monotonic)  # for the idle sweep
    owner: str | None = None  # the account whose conversation it is (None: no credentials)
    window_start: int = 0  # the model sees ``messages`` from here (and the system prompt)
    ready: bool = True  # False while claimed: being loaded, restored or closed


def new_session_id() -> str:
    return f"tmp-{uuid.uuid4().hex}"


def check_owner(session_owner: str | None, caller: str | None, session_id: str) -> None:
    """A conversation is its owner's: another account (or a caller without credentials)
    cannot continue, save, restore, cancel or close it."""
    if session_owner != caller:
        raise ChainError(ps.FORBIDDEN, f"session {session_id} belongs to someone else")


class SessionRegistry:
    """The sessions of one network's gateway (see the module's docstring)."""

    def __init__(
        self, data_dir: Path, network_id: str, chain: ChainClient, store: SessionStore
    ) -> None:
        self.data_dir = Path(data_dir)
        self.network_id = network_id
        self.chain = chain
        self.store = store
        self.resumed = 0  # sessions loaded from the store (not in memory) for a new turn
        self._sessions: dict[str, SessionState] = {}
        self._background: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> SessionState | None:
        return self._sessions.get(session_id)

    def items(self) -> list[tuple[str, SessionState]]:
        return list(self._sessions.items())

    def running(self) -> int:
        """Sessions in a turn now (or being loaded, restored, closed)."""
        return sum(1 for state in list(self._sessions.values()) if state.lock.locked())

    def stats(self) -> dict:
        """In memory now; loaded from the store since start; rebuilt on the nodes by replay."""
        return {"open": len(self), "resumed": self.resumed, "replays": self.chain.replays}

    async def claim(self, session_ids: Iterable[str], owner: str | None = None) -> dict:
        """Register a locked, not yet ``ready`` state for each id not in memory: those ids
        are this caller's until ``unclaim`` (or ``release``). Awaits nothing in between (a
        new lock is taken at once): no other task sees an id half claimed."""
        claimed: dict[str, SessionState] = {}
        for session_id in session_ids:
            if session_id not in self._sessions:
                state = SessionState(owner=owner, ready=False)
                await state.lock.acquire()
                self._sessions[session_id] = claimed[session_id] = state
        return claimed

    def unclaim(self, claimed: dict[str, SessionState]) -> None:
        """Withdraw claims (or forget sessions held locked): whoever waits looks again."""
        for session_id, state in claimed.items():
            if self._sessions.get(session_id) is state:
                del self._sessions[session_id]
            state.lock.release()

    def forget(self, session_id: str) -> None:
        """No longer in memory (its lock is the caller's; the store keeps its history)."""
        self._sessions.pop(session_id, None)

    async def new_id(self) -> str:
        """A session id that no session here has, in memory or in the store (open, closed or
        saved): a new conversation never takes over a stored one."""
        while True:
            session_id = new_session_id()
            if session_id not in self._sessions and not await self._stored(session_id):
                return session_id

    async def _stored(self, session_id: str) -> bool:
        def lookup() -> bool:
            return (
                self.store.get(self.network_id, session_id) is not None
                or self.store.saved(self.network_id, session_id) is not None
            )

        return await asyncio.to_thread(lookup)

    # --- a turn ------------------------------------------------------------------------------

    async def acquire(self, session_id: str, keep: bool, owner: str | None) -> SessionState:
        """The session's state, locked for one turn: in memory, else loaded from the store
        (``keep``), else new (owned by ``owner``). Another owner's session is refused, also
        one that is closed (its row, its answers and its saved KV stay its owner's); a closed
        one of the caller's own starts afresh. A one-off answer (not ``keep``) never runs in
        an id the store holds."""
        while True:
            claimed = await self.claim([session_id], owner)
            if claimed:
                state = claimed[session_id]
                try:
                    await self._load(session_id, state, keep, owner)
                except BaseException:
                    self.unclaim(claimed)
                    raise
                return state
            state = self._sessions[session_id]
            if state.ready:  # refused at once, not after the owner's turn
                check_owner(state.owner, owner, session_id)
            await state.lock.acquire()
            if self._sessions.get(session_id) is state:
                if state.owner == owner:
                    return state
                state.lock.release()
                check_owner(state.owner, owner, session_id)
            state.lock.release()  # closed, freed or never loaded while we waited: look again

    def release(self, session_id: str, state: SessionState, keep: bool) -> None:
        """A turn ended: the next one may start. A one-off session (not ``keep``) is freed
        on the nodes now, in the background (not before its answer's last message)."""
        state.last_used = time.monotonic()
        state.lock.release()
        if not keep:
            self.forget(session_id)
            self._in_background(self._close_temporary(session_id))

    async def remember(self, session_id: str, state: SessionState) -> None:
        """The session after an answer, in the store (for a later turn, or after a restart)."""
        put = functools.partial(self.store.put, owner=state.owner, window_start=state.window_start)
        await self.write(
            put, self.network_id, session_id, state.tokens, state.unfed, state.messages
        )

    async def _load(self, session_id: str, state: SessionState, keep: bool, owner) -> None:
        """Open a new session, or take over one from the store: from its saved KV when it was
        saved at exactly this point, else marked for replay on its next step."""
        stored = await self.check_stored_owner(session_id, owner)
        if stored is not None and not keep:
            raise ChainError(
                ps.INVALID_MESSAGE,
                f"session {session_id} is a kept conversation: continue it with its session id",
            )
        if stored is None or stored.closed:
            # in the store (live) before the nodes hold anything: after a crash, freed there
            put = functools.partial(self.store.put, owner=owner)
            await self.write(put, self.network_id, session_id, [], [], [])
            busy = [s for s, held in self.items() if held.lock.locked() and s != session_id]
            await self.chain.open(session_id, busy)  # on the less busy chain (a replica's)
        else:
            state.tokens, state.unfed = stored.tokens, stored.unfed
            state.messages, state.window_start = stored.messages, stored.window_start
            self.resumed += 1
            if not stored.live:  # the nodes will hold it again
                await self.write(self.store.set_live, self.network_id, [session_id], True)
            if not await self._restore_saved_kv(session_id, stored):
                self.chain.adopt(session_id, state.tokens, stale=True)
        state.ready = True

    async def _restore_saved_kv(self, session_id: str, stored: StoredSession) -> bool:
        saved = await asyncio.to_thread(self.store.saved, self.network_id, session_id)
        if saved is None or (saved.tokens, saved.unfed) != (stored.tokens, stored.unfed):
            return False
        try:
            await self.chain.control(ps.SessionRestore, session_id)
        except (ChainError, PeerUnavailable) as exc:  # e.g. the chain changed since the save
            log.info("session %s: saved KV not restored (%s); replaying", session_id, exc)
            return False
        self.chain.adopt(session_id, stored.tokens, stale=False)
        return True

    async def write(self, method, *args) -> None:
        """A store write that must not fail an answer (a later turn without it replays less
        or starts afresh): logged."""
        try:
            await asyncio.to_thread(method, *args)
        except Exception:
            log.exception("network %s: cannot write the session store", self.network_id)

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def _close_temporary(self, session_id: str) -> None:
        await self.chain.close(session_id)
        await self.write(self.store.delete, self.network_id, session_id)

    async def close_on_nodes(self, session_id: str, *, anywhere: bool = False) -> None:
        """Free a session on its chain's nodes (``anywhere``: a session left from before a
        restart, whose chain is not known: on the main chain and every replica chain)."""
        close = self.chain.close_anywhere if anywhere else self.chain.close
        try:
            await asyncio.wait_for(close(session_id), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("network %s: closing session %s timed out", self.network_id, session_id)

    async def aclose(self) -> None:
        """The frees still running end now (a node that hangs must not hold this up; the
        nodes drop what they held when their links close)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- what the people do with their conversations ------------------------------------------

    async def cancel(self, session_id: str, owner: str | None = None) -> bool:
        """Stop the answer streaming in ``session_id`` (False: none streams); another's
        session is refused, also when it does not stream now."""
        state = self._sessions.get(session_id)
        if state is not None and state.ready:
            check_owner(state.owner, owner, session_id)
            state.cancelled = True
            return True
        await self.check_stored_owner(session_id, owner)
        return False

    async def close(self, session_id: str, owner: str | None = None) -> None:
        """The conversation ends: freed on every node; its history stays in the store, closed
        (a later turn with this id starts afresh; a saved copy can still be restored)."""
        state = self._sessions.get(session_id)
        if state is not None and state.ready:
            check_owner(state.owner, owner, session_id)
        else:
            await self.check_stored_owner(session_id, owner)
        if state is not None:
            async with state.lock:  # after the answer in flight (or the load), if any
                if self._sessions.get(session_id) is state:
                    await self.chain.close(session_id)
                    self.forget(session_id)
                    await asyncio.to_thread(self.store.close, self.network_id, session_id)
                    return
        await asyncio.to_thread(self.store.close, self.network_id, session_id)

    async def check_stored_owner(self, session_id: str, owner: str | None) -> StoredSession | None:
        """The stored session (None: the store has no row of it); another's (open or closed),
        or another's saved copy (its row gone), is refused. An id the store does not hold is
        no one's."""

        def lookup() -> tuple[StoredSession | None, SavedSession | None]:
            return (
                self.store.get(self.network_id, session_id),
                self.store.saved(self.network_id, session_id),
            )

        stored, saved = await asyncio.to_thread(lookup)
        if stored is not None:
            check_owner(stored.owner, owner, session_id)
        if saved is not None:
            check_owner(saved.owner, owner, session_id)
        return stored
