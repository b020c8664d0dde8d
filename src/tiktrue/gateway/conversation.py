"""What a turn asks the chain to hold: the token ids of a request, and the window of a long
conversation that the model sees. Pure functions of the request and the session's messages
(the tokenizer renders them with the chat template); the session registry and the chain are
not touched here."""

from __future__ import annotations

from dataclasses import dataclass

from tiktrue.gateway.errors import ChainError
from tiktrue.model.tokenizer import prompt_ids
from tiktrue.protocol import protocol_spec as ps


@dataclass(frozen=True)
class Prompt:
    """A turn's token ids; ``window_start``: where its messages start (the model sees the
    conversation's messages from there, and the system prompt); ``shifted``: the oldest turns
    left the window for this one."""

    ids: list[int]
    window_start: int
    shifted: bool = False


def conversation_ids(
    tokenizer,
    *,
    messages: list[dict] | None,
    windowed: bool,
    text: str | None,
    input_ids: list[int] | None,
    held: list[int],
    window_start: int,
    room: int,
    context_length: int,
    vocab_size: int,
) -> Prompt:
    """The token ids a turn wants the chain to hold. ``messages``: the conversation, the
    turn's question included, rendered with the chat template (``windowed``: one that goes
    on, windowed so that ``room`` tokens are left for the answer; else all of it); else
    ``text``: raw text; else ``input_ids``: appended to ``held`` (the session's tokens) as
    they are. ``window_start`` is kept unless the window moves."""
    if messages is not None:
        if windowed:
            return window(tokenizer, messages, window_start, room, context_length)
        return Prompt(prompt_ids(tokenizer, messages), window_start)
    if text is not None:
        return Prompt(prompt_ids(tokenizer, text, raw=True), window_start)
    if input_ids is not None:
        wrong = next((i for i in input_ids if not 0 <= i < vocab_size), None)
        if wrong is not None:
            raise ChainError(
                ps.INVALID_MESSAGE,
                f"token id {wrong} is not in the model's vocabulary (0..{vocab_size - 1})",
            )
        return Prompt(held + list(input_ids), window_start)
    raise ChainError(ps.INVALID_MESSAGE, "a request needs messages, text or input_ids")


def window(tokenizer, messages: list[dict], window_start: int, room: int, context: int) -> Prompt:
    """The prompt of a conversation that goes on: its messages from ``window_start`` (the
    leading system prompt always kept). When they leave less than ``room`` tokens for the
    answer, the oldest turns leave the model's window (as llama.cpp's context shift and
    Ollama do): the window then starts at the first user message after which at most half
    the context is used, so the next turns continue it (their prompts are not computed
    again) until it is full again. Each shift recomputes the window once (a prefill of at
    most half the context). The conversation itself keeps every message."""
    system = next((i for i, m in enumerate(messages) if m.get("role") != "system"), 0)
    starts = [i for i, m in enumerate(messages) if i >= system and m.get("role") == "user"]
    if not starts:
        return Prompt(prompt_ids(tokenizer, messages), window_start)
    start = window_start if system <= window_start <= starts[-1] else system

    def render(at: int) -> list[int]:
        return prompt_ids(tokenizer, messages[:system] + messages[at:])

    ids = render(start)
    later = [i for i in starts if i > start]
    if len(ids) + room <= context or not later:  # fits, or the last question alone
        return Prompt(ids, start)
    low, high = 0, len(later) - 1  # the earliest later start that fits the target
    target = min(context - room, context // 2)
    chosen = len(later) - 1
    while low <= high:
        middle = (low + high) // 2
        if len(render(later[middle])) <= target:
            chosen, high = middle, middle - 1
        else:
            low = middle + 1
    start = later[chosen]
    return Prompt(render(start), start, shifted=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def rewinds(held: list[int], wanted: list[int]) -> bool:
    """Whether a turn asking for ``wanted`` must first rewind a session holding ``held``:
    the conversation changed before its end (edited), or nothing is left to run (the answer
    is regenerated from exactly what the caches hold)."""
    return wanted[: len(held)] != held or len(wanted) <= len(held)
