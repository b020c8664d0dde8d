"""What the chat page does, without the page: one person's conversations and answers.

The chat calls the network's :class:`~tiktrue.gateway.api_client.Gateway` in this process,
with the person's account as the owner, so the rules are the API's: a conversation is its
owner's (nobody else continues, stops or deletes it), and each turn counts against the
account's rate limits. The conversations are the gateway's sessions in ``tiktrue.db`` (the API's
sessions and the app's conversations are the same rows); after each answer the nodes save the
conversation's KV cache, so reopening it later (even after a restart) continues without
recomputing the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields

from tiktrue import limits
from tiktrue.gateway.api_client import Gateway
from tiktrue.gateway.errors import ChainError
from tiktrue.gateway.http_errors import SAFE, public_error
from tiktrue.gateway.session_store import Answer, StoredSession
from tiktrue.model.errors import ModelError
from tiktrue.model.generation import GenerationResult
from tiktrue.model.sampling import SAMPLING_FIELDS, SamplingDefaults, SamplingParams
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.security.users import Principal, UserError
from tiktrue.ui.context import UiContext
from tiktrue.ui.i18n import N_, Message, _, isolate
from tiktrue.ui.refusals import account_refusal

log = logging.getLogger("tiktrue.ui")
TITLE_CHARS = 60


class ChatFailure(Exception):
    """A turn that could not be answered; the message (a ``Message``) is for the person."""


@dataclass
class Settings:
    """The person's generation settings for the next turns. A sampling setting left at None
    follows the model's own (``Gateway.sampling_defaults``): a person who changed nothing gets
    what the model recommends."""

    system_prompt: str = ""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int = limits.DEFAULT_MAX_TOKENS

    def sampling(self, defaults: SamplingDefaults) -> SamplingParams:
        """These settings over the model's ``defaults``."""
        return defaults.params(
            **{name: getattr(self, name) for name in SAMPLING_FIELDS}, max_tokens=self.max_tokens
        )

    def chosen(self, name: str, value, defaults: SamplingDefaults) -> None:
        """Set ``name`` to ``value``, or back to following the model when it is the model's."""
        setattr(self, name, None if value == getattr(defaults, name) else value)


SETTINGS_VERSION = 2  # 1 (no version): sampling fields saved with OpenAI's defaults filled in
OLD_DEFAULTS = {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.0}


def settings_from(saved: dict) -> Settings:
    """A person's saved settings (``asdict`` of ``Settings`` with ``version``); those saved by
    an older TikTrue held OpenAI's defaults where the person chose nothing: those follow the
    model now."""
    saved = dict(saved or {})
    if saved.pop("version", 1) < SETTINGS_VERSION:
        for name, old in OLD_DEFAULTS.items():
            if saved.get(name) == old:
                saved[name] = None
    known = {f.name for f in fields(Settings)}
    try:
        return Settings(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, AttributeError):
        return Settings()


def saved_form(settings: Settings) -> dict:
    """What ``settings_from`` reads back."""
    return {**asdict(settings), "version": SETTINGS_VERSION}


@dataclass
class Turn:
    """One answer as it streams: its text so far and, when done, its figures."""

    network_id: str
    model_id: str
    message_index: int
    text: str = ""
    tokens: int = 0
    first_token_ms: float | None = None
    tokens_per_s: float | None = None
    finish_reason: str = ""
    started: float = field(default_factory=time.perf_counter)
    window_start: int = 0  # the model's window starts at this message (older ones left it)

    def answer(self) -> Answer:
        """The answer as the store keeps it."""
        return Answer(
            self.message_index,
            self.model_id,
            self.tokens,
            self.tokens_per_s,
            self.first_token_ms,
            self.finish_reason,
        )


def new_conversation_id() -> str:
    return f"chat-{uuid.uuid4().hex[:16]}"


def title_of(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


class Chat:
    """One person's chat over the node's networks."""

    def __init__(self, context: UiContext, user: Principal) -> None:
        self.context = context
        self.user = user
        self.owner = user.owner

    # --- networks ---------------------------------------------------------------------------

    def networks(self) -> dict[str, str]:
        """Network id -> "name · model" for every network answering here that the person may
        use."""
        return {
            g.network_id: f"{isolate(g.config.name)} · {isolate(g.model_id)}"
            for g in self.context.gateways.values()
            if self.user.allows(g.network_id)
        }

    def defaults(self, network_id: str | None) -> SamplingDefaults:
        """The sampling settings of the model that answers on ``network_id``."""
        gateway = self.context.gateways.get(network_id or "")
        return gateway.sampling_defaults if gateway is not None else SamplingDefaults()

    def gateway(self, network_id: str) -> Gateway:
        gateway = self.context.gateways.get(network_id)
        if gateway is None or not self.user.allows(network_id):
            raise ChatFailure(
                N_("Network {network} does not answer on this PC now.", network=network_id)
            )
        return gateway

    # --- conversations ----------------------------------------------------------------------

    async def new_conversation_id(self, network_id: str) -> str:
        """An id no conversation in the store has (open, closed or saved): a new chat never
        takes over a stored one."""
        store = self.context.sessions

        def taken(session_id: str) -> bool:
            return (
                store.get(network_id, session_id) is not None
                or store.saved(network_id, session_id) is not None
            )

        while True:
            session_id = new_conversation_id()
            if not await asyncio.to_thread(taken, session_id):
                return session_id

    async def conversations(self, search: str = "") -> list[StoredSession]:
        return await asyncio.to_thread(self.context.sessions.owned, self.owner, search=search)

    async def load(self, network_id: str, session_id: str) -> StoredSession | None:
        """The person's conversation (None: not theirs, closed or gone)."""
        stored = await asyncio.to_thread(self.context.sessions.get, network_id, session_id)
        if stored is None or stored.closed or stored.owner != self.owner:
            return None
        return stored

    async def answers(self, network_id: str, session_id: str) -> dict[int, Answer]:
        return await asyncio.to_thread(self.context.sessions.answers, network_id, session_id)

    async def rename(self, network_id: str, session_id: str, title: str) -> None:
        if await self.load(network_id, session_id) is None:
            raise ChatFailure(N_("No such conversation."))
        title = title_of(title) or _("Untitled")
        await asyncio.to_thread(self.context.sessions.set_title, network_id, session_id, title)

    async def delete(self, network_id: str, session_id: str) -> None:
        """Free the conversation on the nodes and forget it."""
        if await self.load(network_id, session_id) is None:
            raise ChatFailure(N_("No such conversation."))
        gateway = self.context.gateways.get(network_id)
        if gateway is not None:
            try:
                await gateway.sessions.close(session_id, self.owner)
            except (ChainError, PeerUnavailable) as exc:  # freed later by the idle sweep
                log.info("conversation %s: not freed on the nodes (%s)", session_id, exc)
        await asyncio.to_thread(self.context.sessions.delete, network_id, session_id)

    async def rate(self, network_id: str, session_id: str, index: int, rating: int | None):
        if await self.load(network_id, session_id) is None:
            raise ChatFailure(N_("No such conversation."))
        await asyncio.to_thread(self.context.sessions.rate, network_id, session_id, index, rating)

    # --- answering --------------------------------------------------------------------------

    async def answer(
        self,
        network_id: str,
        session_id: str,
        messages: list[dict],
        settings: Settings,
        turn: Turn | None = None,
    ) -> AsyncIterator[str]:
        """Stream the answer to ``messages`` (the whole conversation: the system prompt, the
        earlier turns, the new user message; an edited or regenerated one too) as text
        deltas. ``turn`` (made here when None) collects the figures; it is recorded with the
        answer, the conversation titled on its first turn, and its KV cache saved."""
        gateway = self.gateway(network_id)
        try:
            await asyncio.to_thread(self.context.users.hit, self.user)
        except UserError as exc:
            raise ChatFailure(account_refusal(exc)) from exc
        turn = turn or Turn(network_id, gateway.model_id, len(messages))
        result = GenerationResult()
        stream = gateway.answer(
            settings.sampling(gateway.sampling_defaults),
            messages=messages,
            session_id=session_id,
            owner=self.owner,
            result=result,
            priority=self.user.priority_of(None),  # the account's default class
        )
        try:
            async for event in stream:
                if event.text:
                    if turn.first_token_ms is None:
                        turn.first_token_ms = (time.perf_counter() - turn.started) * 1000
                    turn.text += event.text
                    yield event.text
        except (ChainError, ModelError, PeerUnavailable) as exc:
            raise ChatFailure(_why(exc)) from exc
        finally:
            await stream.aclose()
        self._finish(turn, result)
        await self._record(gateway, session_id, messages, turn)

    async def stop(self, network_id: str, session_id: str) -> bool:
        """Stop the answer streaming in this conversation (it keeps what came)."""
        gateway = self.context.gateways.get(network_id)
        if gateway is None:
            return False
        try:
            return await gateway.sessions.cancel(session_id, self.owner)
        except ChainError:  # someone else's conversation
            return False

    def _finish(self, turn: Turn, result: GenerationResult) -> None:
        turn.text = result.text
        turn.tokens = len(result.token_ids)
        turn.finish_reason = result.finish_reason
        elapsed = time.perf_counter() - turn.started
        after_first = elapsed - (turn.first_token_ms or 0) / 1000
        if turn.tokens > 1 and after_first > 0:
            turn.tokens_per_s = (turn.tokens - 1) / after_first
        elif result.decode_tokens_per_second:
            turn.tokens_per_s = result.decode_tokens_per_second

    async def _record(self, gateway: Gateway, session_id: str, messages, turn: Turn) -> None:
        store = self.context.sessions
        answer = turn.answer()
        await asyncio.to_thread(store.record_answer, gateway.network_id, session_id, answer)
        stored = await asyncio.to_thread(store.get, gateway.network_id, session_id)
        if stored is not None:
            turn.window_start = stored.window_start
        if stored is not None and not stored.title:
            first = next((m["content"] for m in messages if m["role"] == "user"), "")
            title = title_of(first) or _("New chat")
            await asyncio.to_thread(store.set_title, gateway.network_id, session_id, title)
        # the nodes keep the KV: a later visit continues without recomputing the prompt (in
        # the background: the next turn waits for it on the session's lock, nothing else does)
        task = asyncio.get_running_loop().create_task(self._save(gateway, session_id))
        _saving.add(task)
        task.add_done_callback(_saving.discard)

    async def _save(self, gateway: Gateway, session_id: str) -> None:
        try:
            await gateway.saves.save(session_id, self.owner)
        except (ChainError, PeerUnavailable, ModelError, OSError) as exc:
            log.info("conversation %s: KV not saved (%s); it will be replayed", session_id, exc)


_saving: set[asyncio.Task] = set()  # saves in flight (a reference keeps each one running)


def _why(exc: Exception) -> Message:
    """For the person, in their language: what went wrong, without server paths or exception
    text (``public_error``: what every caller is told; the details go to the log)."""
    code, message, info = public_error(exc)
    info = info or {}
    if code == "context_length_exceeded" and {"context_length", "prompt_tokens"} <= set(info):
        return N_(
            "The conversation is longer than the model's context: {context} tokens, and this "
            "conversation has {tokens}. Start a new chat, or shorten the question.",
            context=info["context_length"],
            tokens=info["prompt_tokens"],
        )
    if code == "context_length_exceeded":
        return N_("The conversation is longer than the model's context: {detail}", detail=message)
    if code == "forbidden":
        return N_("This conversation belongs to another account.")
    if code == "peer_unavailable":
        return N_("The network could not answer: a PC of the network could not be reached.")
    if code not in SAFE:
        return N_("The network could not answer ({code}); the node's log says more.", code=code)
    return N_("The network could not answer ({code}): {detail}", code=code, detail=message)
