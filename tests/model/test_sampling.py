"""Sampling settings."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tiktrue.model.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.5])


def draws(params: SamplingParams, n: int = 200, history=()) -> list[int]:
    sampler = Sampler(params)
    return [sampler(LOGITS, list(history)) for _ in range(n)]


def test_greedy_takes_the_largest_logit():
    assert set(draws(SamplingParams(temperature=0), 5)) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_k=1), 5)) == {1}


def test_same_seed_same_draws_other_seed_other_draws():
    a = draws(SamplingParams(temperature=1.5, seed=7))
    assert a == draws(SamplingParams(temperature=1.5, seed=7))
    assert a != draws(SamplingParams(temperature=1.5, seed=8))


def test_top_k_and_top_p_limit_the_candidates():
    assert set(draws(SamplingParams(temperature=2.0, top_k=2, seed=1))) == {1, 2}
    # softmax(LOGITS): token 1 ~0.53, token 2 ~0.32: top_p 0.6 keeps exactly those two
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6, seed=1))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1))) == {1}


def test_repetition_penalty_discourages_tokens_already_seen():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert draws(params, 1, history=[1]) == [2]  # 3.0 / 2 < 2.5
    assert draws(SamplingParams(temperature=0), 1, history=[1]) == [1]


def test_settings_are_validated():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
