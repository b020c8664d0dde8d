"""The gateway of a network (seed ``api_client``): tokenizer, chat template, sessions.

``Gateway`` keeps each session's token history (what the chain's KV caches hold), so a
conversation continues by sending only its new tokens, and a replacement worker can later
rebuild its cache by replay; the steps themselves go through ``chain_client``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue import limits
from tiktrue.gateway.chain_client import ChainClient, ChainError, new_session_id
from tiktrue.gateway.session_store import SavedSession, SessionStore, StoredSession
from tiktrue.model.generation import GenerationResult, TokenEvent, stream_tokens
from tiktrue.model.sampling import SamplingDefaults, SamplingParams
from tiktrue.model.store import BlockStore
from tiktrue.model.tokenizer import load_tokenizer, prompt_ids, stop_token_ids
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.gateway")


class ContextLengthExceeded(ChainError):
    """The conversation does not fit the network's context: refused before any step."""

    def __init__(self, context_length: int, prompt_tokens: int) -> None:
        super().__init__(
            ps.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens, which leaves no room for an answer. "
            "Please reduce the length of the messages.",
            {"context_length": context_length, "prompt_tokens": prompt_tokens},
        )
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens


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


# await on_answer(gateway, result, owner, completed): an answer ended (its figures, its tokens
# counted against quotas before the caller hears the end); must not raise
AnswerListener = Callable[["Gateway", GenerationResult, "str | None", bool], Awaitable[None]]
IDLE_TIMEOUT_S = 30 * 60.0  # a session idle this long is freed on the nodes (history kept)
CLOSE_TIMEOUT_S = 30.0  # a close that a hung node never answers is given up


class Gateway:
    """Answers requests for one network.

    Sessions live in three places: ``sessions`` (in memory, while in use), the nodes' KV caches,
    and the store (``<data>/tiktrue.db``), written after every answer. A session that is not in
    memory (after a restart of this node, or freed when it idled out) is loaded from the store
    on its next turn and rebuilt on the nodes by replaying its history (or from its saved KV
    when it was saved at exactly that point).
    """

    def __init__(
        self,
        data_dir: Path,
        config: NetworkConfig,
        credentials: NetworkCredentials,
        local_server=None,
        on_broken=None,
        *,
        session_store: SessionStore | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        on_answer: AnswerListener | None = None,
    ):
        """``on_broken(error)`` is told when the chain fails (a node unreachable), so the
        network's admin can take the lost node's span over. ``on_answer`` hears every answer
        that ran on the chain, once it ended (metrics, history, token quotas)."""
        self.data_dir = Path(data_dir)
        self.config = config
        self.network_id = config.network_id
        self.model_id = config.model_id
        self.store = store = BlockStore(self.data_dir / "models" / config.model_id)
        self.tokenizer = load_tokenizer(store)
        self.stop_ids = stop_token_ids(store, self.tokenizer)
        self.model_config = store.config()
        self._sampling: tuple[tuple, SamplingDefaults] | None = None
        self.credentials = credentials
        self.local_server = local_server
        self.chain = ChainClient(config, credentials, local_server, on_broken=on_broken)
        self.sessions: dict[str, SessionState] = {}
        self.session_store = session_store or SessionStore.open(self.data_dir)
        self.idle_timeout_s = idle_timeout_s
        self.on_answer = on_answer
        self.resumed = 0  # sessions loaded from the store (not in memory) for a new turn
        self._sessions_lock = asyncio.Lock()  # creating or loading a session
        self._closing: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    @property
    def healthy(self) -> bool:
        """False while the chain is broken (a node lost, the network healing or degraded)."""
        return self.chain.healthy

    @property
    def context_length(self) -> int:
        """The most tokens a conversation may hold here, answer included (the network's)."""
        return self.config.context_length(self.model_config)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The model's sampling settings: what a request leaves out (read again when the
        admin changes them; ``BlockStore.sampling_defaults``)."""
        stamp = self.store.sampling_files_stamp()
        if self._sampling is None or self._sampling[0] != stamp:
            self._sampling = (stamp, self.store.sampling_defaults())
        return self._sampling[1]

    def sampling(self, **given) -> SamplingParams:
        """Complete settings: ``given`` (None: left out) over the model's defaults."""
        return self.sampling_defaults.params(**given)

    def switch(self, config: NetworkConfig) -> None:
        """A new config: later steps go to the new chain; sessions are replayed there."""
        self.config = config
        self.chain.switch(config)

    def start(self) -> None:
        """Background work (on the running loop): free on the nodes the sessions they may
        still hold from before this gateway restarted, then sweep idle sessions."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def aclose(self) -> None:
        """Stop: the sweep and the frees still running end now (a node that hangs must not
        hold this up; the nodes drop what they held when their links close), then the chain's
        links close. Nothing writes to the session store after this returns."""
        tasks = [t for t in (self._sweeper, *self._closing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        await self.chain.aclose()

    # --- answering -------------------------------------------------------------------------

    async def answer(
        self,
        params: SamplingParams,
        *,
        messages: list[dict] | None = None,
        text: str | None = None,
        input_ids: list[int] | None = None,
        session_id: str | None = None,
        keep: bool | None = None,
        result: GenerationResult | None = None,
        owner: str | None = None,
        priority: str = limits.DEFAULT_PRIORITY,
    ) -> AsyncIterator[TokenEvent]:
        """Stream an answer. Exactly one input:

        - ``messages``: the whole conversation (OpenAI style), rendered with the chat template;
        - ``text``: one user turn (added to the session's conversation) or raw text without
          a session;
        - ``input_ids``: token ids appended to the session as they are.

        A session is kept for the next turn when ``keep`` (default: when ``session_id`` is
        given), and written to the store after the answer; otherwise the answer runs in a
        fresh session that is closed afterwards. A turn that does not complete (an error, the
        client gone) leaves the session as it was before the turn; the nodes, which may hold
        part of it, rebuild it by replay on the next turn. A session belongs to the ``owner``
        that opened it: nobody else continues it. ``priority``: the answer's class
        (``limits.PRIORITIES``), which every node's span worker honours under load.
        """
        result = result if result is not None else GenerationResult()
        keep = session_id is not None if keep is None else keep
        session_id = session_id or await self.new_session_id()
        state = await self._acquire(session_id, keep, owner)
        self.chain.prioritize(session_id, priority)
        before = (list(state.tokens), list(state.unfed), list(state.messages), state.window_start)
        stepped = completed = False
        try:
            state.cancelled = False
            wanted = self._conversation_ids(state, messages, text, input_ids, keep, params)
            if not wanted:
                raise ChainError(ps.INVALID_MESSAGE, "nothing to answer: the input is empty")
            room = self.context_length - len(wanted)  # refused before anything is sent
            if room < 1:
                raise ContextLengthExceeded(self.context_length, len(wanted))
            if params.max_tokens > room:  # the answer stops at the context ("length")
                params = params.model_copy(update={"max_tokens": room})
            if input_ids is None and _rewinds(state.tokens, wanted):
                stepped = True  # from here on the nodes may hold less than ``before``
                await self._rewind(session_id, state, wanted)
            new = wanted[len(state.tokens) :]
            if not new:
                raise ChainError(ps.INVALID_MESSAGE, "nothing new to answer")
            stream = stream_tokens(
                self.chain,
                new,
                params,
                tokenizer=self.tokenizer,
                stop_ids=self.stop_ids,
                session_id=session_id,
                start=len(state.tokens),
                result=result,
                should_stop=lambda: state.cancelled,
            )
            stepped = True
            try:
                async for event in stream:
                    yield event
            finally:
                await stream.aclose()  # its step in flight ends before the session is touched
            state.tokens += new + result.token_ids[: result.decode_steps]
            state.unfed = result.token_ids[result.decode_steps :]
            if messages is not None or (text is not None and keep):
                state.messages.append({"role": "assistant", "content": result.text})
            completed = True
            if keep:
                await self._write(
                    functools.partial(
                        self.session_store.put, owner=state.owner, window_start=state.window_start
                    ),
                    self.network_id,
                    session_id,
                    state.tokens,
                    state.unfed,
                    state.messages,
                )
        finally:
            state.last_used = time.monotonic()
            if keep and not completed:
                state.tokens, state.unfed, state.messages, state.window_start = before
                if stepped:
                    self.chain.adopt(session_id, state.tokens, stale=True)
            state.lock.release()
            if not keep:  # freed on the nodes after the answer, not before its last message
                self.sessions.pop(session_id, None)
                self._in_background(self._close_temporary(session_id))
            if stepped and self.on_answer is not None:  # last: the session is released
                await self.on_answer(self, result, state.owner, completed)

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._closing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._closing.discard)

    async def new_session_id(self) -> str:
        """A session id that no session here has, in memory or in the store (open, closed or
        saved): a new conversation never takes over a stored one."""
        while True:
            session_id = new_session_id()
            if session_id not in self.sessions and not await self._stored(session_id):
                return session_id

    async def _stored(self, session_id: str) -> bool:
        def lookup() -> bool:
            return (
                self.session_store.get(self.network_id, session_id) is not None
                or self.session_store.saved(self.network_id, session_id) is not None
            )

        return await asyncio.to_thread(lookup)

    async def _acquire(self, session_id: str, keep: bool, owner: str | None) -> SessionState:
        """The session's state, locked for one turn: in memory, else loaded from the store
        (``keep``), else new (owned by ``owner``). Another owner's session is refused, also
        one that is closed (its row, its answers and its saved KV stay its owner's); a closed
        one of the caller's own starts afresh. A one-off answer (not ``keep``) never runs in
        an id the store holds."""
        while True:
            async with self._sessions_lock:
                state = self.sessions.get(session_id)
                if state is None:
                    stored = await self._check_stored_owner(session_id, owner)
                    if stored is not None and not keep:
                        raise ChainError(
                            ps.INVALID_MESSAGE,
                            f"session {session_id} is a kept conversation: continue it with "
                            "its session id",
                        )
                    state = SessionState(owner=owner)
                    self.sessions[session_id] = state
                    await state.lock.acquire()  # a new lock: at once
                    try:
                        await self._prepare(session_id, state, stored)
                    except BaseException:
                        self.sessions.pop(session_id, None)
                        state.lock.release()
                        raise
                    return state
            _check_owner(state.owner, owner, session_id)
            await state.lock.acquire()
            if self.sessions.get(session_id) is state:
                return state
            state.lock.release()  # closed or freed while we waited: look again

    async def _prepare(self, session_id: str, state: SessionState, stored) -> None:
        """Open a new session, or take over one from the store: from its saved KV when it was
        saved at exactly this point, else marked for replay on its next step."""
        if stored is None or stored.closed:
            # in the store (live) before the nodes hold anything: after a crash, freed there
            put = functools.partial(self.session_store.put, owner=state.owner)
            await self._write(put, self.network_id, session_id, [], [], [])
            busy = [
                s for s, held in self.sessions.items() if held.lock.locked() and s != session_id
            ]
            await self.chain.open(session_id, busy)  # on the less busy chain (a replica's)
            return
        state.tokens, state.unfed, state.messages = stored.tokens, stored.unfed, stored.messages
        state.window_start = stored.window_start
        self.resumed += 1
        if not stored.live:  # the nodes will hold it again
            await self._write(self.session_store.set_live, self.network_id, [session_id], True)
        if not await self._restore_saved_kv(session_id, stored):
            self.chain.adopt(session_id, state.tokens, stale=True)

    async def _restore_saved_kv(self, session_id: str, stored: StoredSession) -> bool:
        saved = await asyncio.to_thread(self.session_store.saved, self.network_id, session_id)
        if saved is None or (saved.tokens, saved.unfed) != (stored.tokens, stored.unfed):
            return False
        try:
            await self.chain.control(ps.SessionRestore, session_id)
        except (ChainError, PeerUnavailable) as exc:  # e.g. the chain changed since the save
            log.info("session %s: saved KV not restored (%s); replaying", session_id, exc)
            return False
        self.chain.adopt(session_id, stored.tokens, stale=False)
        return True

    async def _write(self, method, *args) -> None:
        """A store write that must not fail an answer (a later turn without it replays less
        or starts afresh): logged."""
        try:
            await asyncio.to_thread(method, *args)
        except Exception:
            log.exception("network %s: cannot write the session store", self.network_id)

    async def _close_temporary(self, session_id: str) -> None:
        await self.chain.close(session_id)
        await self._write(self.session_store.delete, self.network_id, session_id)

    def _conversation_ids(self, state, messages, text, input_ids, keep, params) -> list[int]:
        if messages is not None and not keep:  # one request (the OpenAI API): all of it
            state.messages = list(messages)
            return prompt_ids(self.tokenizer, state.messages)
        if messages is not None or text is not None and keep:  # a conversation that goes on
            if messages is not None:
                state.messages = list(messages)
            else:
                state.messages.append({"role": "user", "content": text})
            return self._window(state, min(params.max_tokens, self.context_length // 2))
        if text is not None:
            return prompt_ids(self.tokenizer, text, raw=True)
        if input_ids is not None:
            vocab = self.model_config.vocab_size
            wrong = next((i for i in input_ids if not 0 <= i < vocab), None)
            if wrong is not None:
                raise ChainError(
                    ps.INVALID_MESSAGE,
                    f"token id {wrong} is not in the vocabulary of {self.model_id} "
                    f"(0..{vocab - 1})",
                )
            return state.tokens + state.unfed + list(input_ids)
        raise ChainError(ps.INVALID_MESSAGE, "a request needs messages, text or input_ids")

    def _window(self, state: SessionState, room: int) -> list[int]:
        """The prompt of a conversation that goes on: its messages from ``window_start`` (the
        leading system prompt always kept). When they leave less than ``room`` tokens for the
        answer, the oldest turns leave the model's window (as llama.cpp's context shift and
        Ollama do): the window then starts at the first user message after which at most half
        the context is used, so the next turns continue it (their prompts are not computed
        again) until it is full again. Each shift recomputes the window once (a prefill of at
        most half the context). ``state.window_start`` says where it starts; the conversation
        itself keeps every message."""
        messages, context = state.messages, self.context_length
        system = next((i for i, m in enumerate(messages) if m.get("role") != "system"), 0)
        starts = [i for i, m in enumerate(messages) if i >= system and m.get("role") == "user"]
        if not starts:
            return prompt_ids(self.tokenizer, messages)
        start = state.window_start if system <= state.window_start <= starts[-1] else system

        def render(at: int) -> list[int]:
            return prompt_ids(self.tokenizer, messages[:system] + messages[at:])

        ids = render(start)
        if len(ids) + room <= context:
            state.window_start = start
            return ids
        later = [i for i in starts if i > start]
        low, high = 0, len(later) - 1  # the earliest later start that fits the target
        target = min(context - room, context // 2)
        chosen = len(later) - 1
        while low <= high:
            middle = (low + high) // 2
            if len(render(later[middle])) <= target:
                chosen, high = middle, middle - 1
            else:
                low = middle + 1
        if not later:  # the last question alone: what room it leaves is all there is
            state.window_start = start
            return ids
        start = later[chosen]
        ids = render(start)
        state.window_start = start
        log.info(
            "network %s: a conversation's oldest turns left the model's window (it starts at "
            "message %d, %d tokens)",
            self.network_id,
            start,
            len(ids),
        )
        return ids

    async def _rewind(self, session_id: str, state: SessionState, wanted: list[int]) -> None:
        """An edited question or a regenerated answer: keep what the caches hold of
        ``wanted`` (the common prefix) and forget the rest, so only the part that changed is
        computed again; at least ``wanted``'s last token is run again (its logits give the
        answer's first token)."""
        keep = min(_common_prefix(state.tokens, wanted), len(wanted) - 1)
        await self.chain.truncate(session_id, keep)
        state.tokens, state.unfed = state.tokens[:keep], []

    def session_stats(self) -> dict:
        """In memory now; loaded from the store since start; rebuilt on the nodes by replay."""
        return {"open": len(self.sessions), "resumed": self.resumed, "replays": self.chain.replays}

    async def cancel(self, session_id: str, owner: str | None = None) -> bool:
        """Stop the answer streaming in ``session_id`` (False: none streams); another's
        session is refused, also when it does not stream now."""
        state = self.sessions.get(session_id)
        if state is not None:
            _check_owner(state.owner, owner, session_id)
            state.cancelled = True
            return True
        await self._check_stored_owner(session_id, owner)
        return False

    # --- freeing sessions on the nodes ------------------------------------------------------

    async def free_idle(self, idle_s: float | None = None) -> list[str]:
        """Close on every node the sessions unused for ``idle_s`` (default: the gateway's idle
        timeout); their history stays in the store and a later turn rebuilds them."""
        limit = self.idle_timeout_s if idle_s is None else idle_s
        freed = []
        for session_id, state in list(self.sessions.items()):
            if state.lock.locked() or time.monotonic() - state.last_used < limit:
                continue
            async with state.lock:  # a turn that comes meanwhile waits, then loads it again
                if self.sessions.get(session_id) is not state:
                    continue
                if time.monotonic() - state.last_used < limit:
                    continue
                await self._close_on_nodes(session_id)
                self.sessions.pop(session_id, None)
                await self._write(self.session_store.set_live, self.network_id, [session_id], False)
            freed.append(session_id)
        if freed:
            log.info("network %s: freed %d idle session(s)", self.network_id, len(freed))
        return freed

    async def free_left_over(self) -> list[str]:
        """After a restart: the nodes may still hold sessions this gateway had (its own node's
        KV is gone, so they will be replayed anyway): close them there."""
        left = await asyncio.to_thread(self.session_store.live_sessions, self.network_id)
        freed = []
        for start in range(0, len(left), 32):
            async with self._sessions_lock:  # no session is loaded while its close is in flight
                batch = [s for s in left[start : start + 32] if s not in self.sessions]
                await asyncio.gather(*(self._close_on_nodes(s, anywhere=True) for s in batch))
            await asyncio.to_thread(self.session_store.set_live, self.network_id, batch, False)
            freed += batch
        return freed

    async def _close_on_nodes(self, session_id: str, *, anywhere: bool = False) -> None:
        """Free a session on its chain's nodes (``anywhere``: a session left from before a
        restart, whose chain is not known: on the main chain and every replica chain)."""
        close = self.chain.close_anywhere if anywhere else self.chain.close
        try:
            await asyncio.wait_for(close(session_id), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("network %s: closing session %s timed out", self.network_id, session_id)

    async def _sweep_forever(self) -> None:
        try:
            await self.free_left_over()
        except Exception:
            log.exception("network %s: cannot free the sessions of the last run", self.network_id)
        interval = min(60.0, max(0.05, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.free_idle()
            except Exception:
                log.exception("network %s: the idle sweep failed", self.network_id)

    # --- sessions across restarts -----------------------------------------------------------

    def _session_dir(self, session_id: str) -> Path:
        return self.data_dir / "sessions" / self.network_id / session_id

    async def save_session(self, session_id: str, owner: str | None = None) -> Path:
        """Every node saves its layers' KV cache; the gateway saves the history (store), with
        its owner. Another's session is refused, open or closed; a closed one is not found."""
        state = self.sessions.get(session_id)
        if state is not None:
            _check_owner(state.owner, owner, session_id)
        else:
            stored = await self._check_stored_owner(session_id, owner)
            if stored is None or stored.closed:
                raise ChainError(ps.SESSION_NOT_FOUND, f"no open session {session_id}")
        state = await self._acquire(session_id, True, owner)
        try:
            await self.chain.rebuild(session_id, len(state.tokens))  # loaded from the store
            await self.chain.control(ps.SessionSave, session_id)
            await asyncio.to_thread(
                functools.partial(
                    self.session_store.save, owner=state.owner, window_start=state.window_start
                ),
                self.network_id,
                session_id,
                state.tokens,
                state.unfed,
                state.messages,
            )
        finally:
            state.last_used = time.monotonic()
            state.lock.release()
        return self._session_dir(session_id)

    async def restore_session(self, session_id: str, owner: str | None = None) -> None:
        """Load a saved session on every node; it continues without recomputing its prompt.
        Only the owner of the save restores it (and only over a session row of their own)."""
        await self._check_stored_owner(session_id, owner)  # the save and the row: theirs
        saved = await asyncio.to_thread(self.session_store.saved, self.network_id, session_id)
        saved = saved or self._saved_by_an_older_version(session_id)
        if saved is None:
            raise ChainError(ps.SESSION_NOT_FOUND, f"no saved session {session_id}")
        async with self._sessions_lock:
            if session_id in self.sessions:
                raise ChainError(ps.INVALID_MESSAGE, f"session {session_id} is already open")
            try:
                await self.chain.control(ps.SessionRestore, session_id)
            except (ChainError, PeerUnavailable):  # the nodes before the failing one hold it
                await self._close_on_nodes(session_id)
                raise
            self.chain.adopt(session_id, saved.tokens, stale=False)
            self.sessions[session_id] = SessionState(
                tokens=list(saved.tokens),
                unfed=list(saved.unfed),
                messages=list(saved.messages),
                owner=owner,
                window_start=saved.window_start,
            )
        await asyncio.to_thread(
            functools.partial(self.session_store.put, owner=owner, window_start=saved.window_start),
            self.network_id,
            session_id,
            saved.tokens,
            saved.unfed,
            saved.messages,
        )

    def _saved_by_an_older_version(self, session_id: str) -> SavedSession | None:
        """Saves made before the store kept the gateway's part in ``gateway.json``."""
        path = self._session_dir(session_id) / "gateway.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text("utf-8"))
        return SavedSession(saved["tokens"], saved["unfed"], saved["messages"], 0.0)

    async def _check_saved_owner(self, session_id: str, owner: str | None) -> None:
        """A saved copy of another's session (its row gone) is still theirs."""
        saved = await asyncio.to_thread(self.session_store.saved, self.network_id, session_id)
        if saved is not None:
            _check_owner(saved.owner, owner, session_id)

    async def _check_stored_owner(self, session_id: str, owner: str | None) -> StoredSession | None:
        """The stored session (None: the store has no row of it); another's (open or closed),
        or another's saved copy, is refused. An id the store does not hold is no one's."""
        stored = await asyncio.to_thread(self.session_store.get, self.network_id, session_id)
        if stored is not None:
            _check_owner(stored.owner, owner, session_id)
        await self._check_saved_owner(session_id, owner)
        return stored

    async def close_session(self, session_id: str, owner: str | None = None) -> None:
        """The conversation ends: freed on every node; its history stays in the store, closed
        (a later turn with this id starts afresh; a saved copy can still be restored)."""
        state = self.sessions.get(session_id)
        if state is not None:
            _check_owner(state.owner, owner, session_id)
        else:
            await self._check_stored_owner(session_id, owner)
        if state is not None:
            async with state.lock:  # after the answer in flight, if any
                if self.sessions.get(session_id) is state:
                    await self.chain.close(session_id)
                    self.sessions.pop(session_id, None)
                    await asyncio.to_thread(self.session_store.close, self.network_id, session_id)
                    return
        await asyncio.to_thread(self.session_store.close, self.network_id, session_id)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _rewinds(held: list[int], wanted: list[int]) -> bool:
    """Whether a turn asking for ``wanted`` must first rewind a session holding ``held``:
    the conversation changed before its end (edited), or nothing is left to run (the answer
    is regenerated from exactly what the caches hold)."""
    return wanted[: len(held)] != held or len(wanted) <= len(held)


def _check_owner(session_owner: str | None, caller: str | None, session_id: str) -> None:
    """A conversation is its owner's: another account (or a caller without credentials)
    cannot continue, save, restore, cancel or close it."""
    if session_owner != caller:
        raise ChainError(ps.FORBIDDEN, f"session {session_id} belongs to someone else")
