"""The gateway of a network (seed ``api_client``): tokenizer, chat template, sampling settings,
and ``answer``, which runs one turn of a session through the chain.

``Gateway`` holds the network's sessions (``session_registry``: each session's token history,
what the chain's KV caches hold, so a conversation continues by sending only its new tokens,
and a replacement worker can later rebuild its cache by replay), their saves
(``session_saves``) and their background frees (``session_sweeper``); the steps themselves go
through ``chain_client``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from tiktrue import limits
from tiktrue.gateway.chain_client import ChainClient
from tiktrue.gateway.conversation import common_prefix, conversation_ids, rewinds
from tiktrue.gateway.errors import ChainError, ContextLengthExceeded
from tiktrue.gateway.session_registry import SessionRegistry, SessionState
from tiktrue.gateway.session_saves import SessionSaves
from tiktrue.gateway.session_store import SessionStore
from tiktrue.gateway.session_sweeper import IDLE_TIMEOUT_S, SessionSweeper
from tiktrue.model.generation import GenerationResult, TokenEvent, stream_tokens
from tiktrue.model.sampling import SamplingDefaults, SamplingParams
from tiktrue.model.store import BlockStore
from tiktrue.model.tokenizer import load_tokenizer, stop_token_ids
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.security.node_tls import NetworkCredentials

log = logging.getLogger("tiktrue.gateway")

# await on_answer(gateway, result, owner, completed): an answer ended (its figures, its tokens
# counted against quotas before the caller hears the end); must not raise
AnswerListener = Callable[["Gateway", GenerationResult, "str | None", bool], Awaitable[None]]


class Gateway:
    """Answers requests for one network: ``answer`` runs a turn; ``sessions`` (the registry:
    cancel, close, new ids, figures), ``saves`` (save, restore) and ``sweeper`` (idle and
    left-over frees) keep the sessions."""

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
        self.sessions = SessionRegistry(
            self.data_dir,
            self.network_id,
            self.chain,
            session_store or SessionStore.open(self.data_dir),
        )
        self.saves = SessionSaves(self.sessions)
        self.sweeper = SessionSweeper(self.sessions, idle_timeout_s)
        self.on_answer = on_answer

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
        self.sweeper.start()

    async def aclose(self) -> None:
        """Stop: the sweep and the frees still running end now (a node that hangs must not
        hold this up; the nodes drop what they held when their links close), then the chain's
        links close. Nothing writes to the session store after this returns."""
        await self.sweeper.aclose()
        await self.sessions.aclose()
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
        session_id = session_id or await self.sessions.new_id()
        state = await self.sessions.acquire(session_id, keep, owner)
        self.chain.prioritize(session_id, priority)
        before = (list(state.tokens), list(state.unfed), list(state.messages), state.window_start)
        stepped = completed = False
        try:
            state.cancelled = False
            wanted = self._prompt(state, messages, text, input_ids, keep, params)
            if not wanted:
                raise ChainError(ps.INVALID_MESSAGE, "nothing to answer: the input is empty")
            room = self.context_length - len(wanted)  # refused before anything is sent
            if room < 1:
                raise ContextLengthExceeded(self.context_length, len(wanted))
            if params.max_tokens > room:  # the answer stops at the context ("length")
                params = params.model_copy(update={"max_tokens": room})
            if input_ids is None and rewinds(state.tokens, wanted):
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
                await self.sessions.remember(session_id, state)
        finally:
            if keep and not completed:
                state.tokens, state.unfed, state.messages, state.window_start = before
                if stepped:
                    self.chain.adopt(session_id, state.tokens, stale=True)
            self.sessions.release(session_id, state, keep)
            if stepped and self.on_answer is not None:  # last: the session is released
                await self.on_answer(self, result, state.owner, completed)

    def _prompt(self, state: SessionState, messages, text, input_ids, keep, params) -> list[int]:
        """The turn's token ids (``conversation``); the session's messages and window follow
        the request."""
        if messages is not None:
            state.messages = list(messages)
        elif text is not None and keep:  # a conversation that goes on
            state.messages.append({"role": "user", "content": text})
        talk = messages is not None or (text is not None and keep)
        prompt = conversation_ids(
            self.tokenizer,
            messages=state.messages if talk else None,
            windowed=keep,
            text=text,
            input_ids=input_ids,
            held=state.tokens + state.unfed,
            window_start=state.window_start,
            room=min(params.max_tokens, self.context_length // 2),
            context_length=self.context_length,
            vocab_size=self.model_config.vocab_size,
        )
        state.window_start = prompt.window_start
        if prompt.shifted:
            log.info(
                "network %s: a conversation's oldest turns left the model's window (it starts "
                "at message %d, %d tokens)",
                self.network_id,
                prompt.window_start,
                len(prompt.ids),
            )
        return prompt.ids

    async def _rewind(self, session_id: str, state: SessionState, wanted: list[int]) -> None:
        """An edited question or a regenerated answer: keep what the caches hold of
        ``wanted`` (the common prefix) and forget the rest, so only the part that changed is
        computed again; at least ``wanted``'s last token is run again (its logits give the
        answer's first token)."""
        keep = min(common_prefix(state.tokens, wanted), len(wanted) - 1)
        await self.chain.truncate(session_id, keep)
        state.tokens, state.unfed = state.tokens[:keep], []
