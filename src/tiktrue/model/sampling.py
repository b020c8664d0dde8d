"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seed."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tiktrue import limits
from tiktrue.limits import MaxTokens, RepetitionPenalty, Seed, StopStrings, Temperature, TopK, TopP


class SamplingParams(BaseModel):
    """Generation settings (bounds and defaults: ``tiktrue.limits``). ``temperature == 0``
    means greedy."""

    temperature: Temperature = limits.DEFAULT_TEMPERATURE
    top_k: TopK = 0
    top_p: TopP = 1.0
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Seed | None = None
    stop: StopStrings = Field(default_factory=list)
    max_tokens: MaxTokens = limits.DEFAULT_MAX_TOKENS

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Applies ``SamplingParams`` to logits; seeded, so the same seed gives the same answer."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """The next token for ``logits`` ``[vocab]`` after the tokens in ``history``."""
        p = self.params
        logits = logits.reshape(-1).float()
        if p.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), dtype=torch.long)
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(
                scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty
            )
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class SessionSampler:
    """The sampling state of one session where its head runs: settings and every token fed.

    Repetition penalty looks at the whole conversation, so the history holds every token the
    chain has consumed (prompt and answers); settings may change at each turn.
    """

    def __init__(self, params: SamplingParams | None = None, history: list[int] | None = None):
        self.history: list[int] = list(history or [])
        self.sampler = Sampler(params or SamplingParams(temperature=0))

    def set_params(self, params: SamplingParams) -> None:
        self.sampler = Sampler(params)

    def next_token(self, logits: torch.Tensor, fed: list[int]) -> int:
        self.history.extend(fed)
        return self.sampler(logits, self.history)
