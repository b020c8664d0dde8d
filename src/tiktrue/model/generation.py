"""Generation through a chain of spans: the token loop shared by every front end.

The loop needs a chain with ``async step(session_id, token_ids, start, sampling) -> token``:
the chain runs the new tokens through every span and the head samples the next token (so in
a network only a token id comes back, never logits). ``LocalChain`` runs the spans in this
process; the gateway's ``ChainClient`` runs them on the nodes of a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tiktrue.model.engine import BlockEngine
from tiktrue.model.sampling import SamplingParams, SessionSampler
from tiktrue.model.tokenizer import IncrementalDecoder


class LocalChain:
    """Spans in one process, called one after the other."""

    def __init__(self, engines: list[BlockEngine]) -> None:
        if not engines or not engines[0].span.has_embed or not engines[-1].span.has_head:
            raise ValueError("a chain must run from embed to head")
        self.engines = engines
        self.samplers: dict[str, SessionSampler] = {}

    def open(self, session_id: str) -> None:
        for engine in self.engines:
            engine.open_session(session_id)
        self.samplers[session_id] = SessionSampler()

    def close(self, session_id: str) -> None:
        for engine in self.engines:
            engine.close_session(session_id)
        self.samplers.pop(session_id, None)

    async def step(
        self,
        session_id: str,
        token_ids: list[int],
        start: int,
        sampling: SamplingParams | None = None,
    ) -> int:
        logits = self.forward(session_id, token_ids, start)
        sampler = self.samplers[session_id]
        if sampling is not None:
            sampler.set_params(sampling)
        return sampler.next_token(logits, token_ids)

    def forward(self, session_id: str, token_ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor(token_ids, dtype=torch.long)
        for engine in self.engines:
            x = engine.forward(session_id, x, start)
        return x[0]

    def save(self, session_id: str, directory: Path) -> None:
        for i, engine in enumerate(self.engines):
            engine.save_session(session_id, Path(directory) / f"span{i}.npz")

    def load(self, session_id: str, directory: Path, history: list[int]) -> None:
        for i, engine in enumerate(self.engines):
            engine.load_session(session_id, Path(directory) / f"span{i}.npz")
        self.samplers[session_id] = SessionSampler(history=history)


@dataclass
class TokenEvent:
    token_id: int | None  # None: text held back for a possible stop string, released at the end
    text: str  # the new text this token completes (may be empty)


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    time_to_first_token: float = 0.0
    decode_steps: int = 0  # chain steps after the first (the prompt's)
    decode_seconds: float = 0.0
    step_timings: list = field(default_factory=list)  # per decode step, when the chain tells

    @property
    def decode_tokens_per_second(self) -> float:
        if self.decode_steps and self.decode_seconds > 0:
            return self.decode_steps / self.decode_seconds
        return 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        """The prompt's tokens over the time to the first token (its prefill and the first
        sample), as llama.cpp's "prompt eval" rate."""
        if self.prompt_tokens and self.time_to_first_token > 0:
            return self.prompt_tokens / self.time_to_first_token
        return 0.0

    def timings(self, load_seconds: float | None = None) -> list[str]:
        """The answer's timings in the lines llama.cpp prints after an answer
        (``llama_perf_context_print``), plus the time to the first token."""
        lines = []
        if load_seconds is not None:
            lines.append(f"{'load time':>20} = {load_seconds * 1e3:10.2f} ms")

        def rate(label: str, seconds: float, count: int, unit: str) -> str:
            per = seconds * 1e3 / count if count else 0.0
            speed = count / seconds if seconds > 0 else 0.0
            return (
                f"{label:>20} = {seconds * 1e3:10.2f} ms / {count:5d} {unit} "
                f"({per:8.2f} ms per token, {speed:8.2f} tokens per second)"
            )

        prompt = self.time_to_first_token
        lines.append(rate("prompt eval time", prompt, self.prompt_tokens, "tokens"))
        lines.append(rate("eval time", self.decode_seconds, self.decode_steps, "runs  "))
        total = self.time_to_first_token + self.decode_seconds
        lines.append(
            f"{'total time':>20} = {total * 1e3:10.2f} ms / "
            f"{self.prompt_tokens + self.decode_steps:5d} tokens"
        )
        lines.append(f"{'time to first token':>20} = {self.time_to_first_token * 1e3:10.2f} ms")
        return lines


async def stream_tokens(
    chain,
    prompt: list[int],
    params: SamplingParams,
    *,
    tokenizer,
    stop_ids: set[int],
    session_id: str,
    start: int = 0,
    result: GenerationResult | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AsyncIterator[TokenEvent]:
    """Run ``prompt`` through the chain and yield each sampled token with its text.

    The session must be open; ``start`` is how many positions it already holds (a resumed
    conversation sends only the new tokens). Stop strings are cut from the text, and text
    that might be the beginning of a stop string is held back until it is decided.

    Each token goes back into the chain as soon as it is known not to end the answer (not a
    stop id, not the last by count), before it is detokenized and handed to the caller: the
    chain computes the next token while the caller streams this one. When a stop string or a
    cancel ends the answer, that step still completes; ``result.decode_steps`` counts it, so
    the caller knows which tokens the chain's caches hold (the first ``decode_steps``).
    """
    result = result if result is not None else GenerationResult()
    result.prompt_tokens = len(prompt)
    decoder = IncrementalDecoder(tokenizer)
    pending = ""  # text held back: it could still become a stop string
    began = time.perf_counter()
    token = await _timed_step(chain, result, session_id, prompt, start, params)
    position = start + len(prompt)
    result.time_to_first_token = time.perf_counter() - began
    first_at = time.perf_counter()
    stopped = False  # by a stop string
    ahead: asyncio.Task | None = None  # the next step, already running
    try:
        while True:
            if token in stop_ids:
                result.finish_reason = "stop"
                break
            result.token_ids.append(token)
            if len(result.token_ids) < params.max_tokens:
                ahead = asyncio.ensure_future(
                    _timed_step(chain, result, session_id, [token], position)
                )
                position += 1
                await asyncio.sleep(0)  # let the step reach the chain before the work below
            pending += decoder.push(token)
            emit, pending, stopped = _split_at_stop(pending, params.stop)
            result.text += emit
            if emit or not stopped:
                yield TokenEvent(token, emit)
            if stopped:  # the stop string and anything after it are dropped
                result.finish_reason = "stop"
                break
            if ahead is None:
                break
            if should_stop and should_stop():
                result.finish_reason = "cancelled"
                break
            token = await ahead
            ahead = None
            result.decode_steps += 1
    finally:
        if ahead is not None:  # a step the answer no longer needs: let it finish, count it
            with contextlib.suppress(Exception):
                await ahead
                result.decode_steps += 1
    if not stopped:
        pending += decoder.flush()
    if pending:
        result.text += pending
        yield TokenEvent(None, pending)
    result.decode_seconds = time.perf_counter() - first_at


async def _timed_step(chain, result: GenerationResult, session_id, token_ids, start, params=None):
    """One chain step; the chain's own timing of a decode step goes to the result."""
    token = await chain.step(session_id, token_ids, start, params)
    timing = getattr(chain, "last_step", None)
    if timing is not None and len(token_ids) == 1:
        result.step_timings.append(timing)
    return token


def _split_at_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text to emit, text to hold back, whether a stop string was found)."""
    if not stops:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False
