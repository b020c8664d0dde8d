"""Sampling settings."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from tiktrue.model.sampling import (
    Sampler,
    SamplingDefaults,
    SamplingParams,
    SessionSampler,
    TokenHistory,
)

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.5])


def draws(params: SamplingParams, n: int = 200, history=()) -> list[int]:
    """``n`` draws of one sampler (the filters not named are off, as in the tests below)."""
    off = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
    unset = {k: v for k, v in off.items() if k not in params.model_fields_set}
    params = params.model_copy(update=unset)
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


def test_min_p_keeps_tokens_near_the_most_likely():
    # softmax(LOGITS): ~0.53, 0.32, 0.08, 0.05, 0.02 for tokens 1, 2, 4, 0, 3 (approximately)
    wide = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    assert set(draws(wide, 400)) == {0, 1, 2, 3, 4}
    assert set(draws(wide.model_copy(update={"min_p": 0.5}), 400)) == {1, 2}  # 0.32 >= 0.26
    assert set(draws(wide.model_copy(update={"min_p": 0.7}), 400)) == {1}
    with pytest.raises(ValidationError):
        SamplingParams(min_p=1.5)


def test_a_seed_gives_the_same_draws_with_every_filter_and_the_penalty():
    params = SamplingParams(temperature=1.3, top_k=4, top_p=0.9, min_p=0.02, seed=11)
    penalized = params.model_copy(update={"repetition_penalty": 1.5})
    for p in (params, penalized):
        assert draws(p, 100, history=[1, 2, 2]) == draws(p, 100, history=[1, 2, 2])
    assert draws(params, 100) != draws(params.model_copy(update={"seed": 12}), 100)


def test_the_repetition_penalty_follows_the_history_as_it_changes():
    """The head's history grows by each step's tokens and is cut by a rewind (``del h[n:]``);
    the ids it penalizes are always those it holds, whatever the change."""
    history = TokenHistory([4, 4, 0])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=10.0))

    def penalized() -> set[int]:
        return {i for i in history.seen_ids().tolist() if i < 5}

    assert penalized() == {0, 4}
    history.extend([1, 1])
    history.append(2)
    assert penalized() == {0, 1, 2, 4} and sampler(LOGITS, history) == 1  # 0.3 > 0.25
    del history[4:]  # one 1 and the 2 go: 1 is still there once
    assert history == [4, 4, 0, 1] and penalized() == {0, 1, 4}
    assert sampler(LOGITS, history) == 2
    del history[3]
    history.pop()
    assert history == [4, 4] and penalized() == {4}
    assert sampler(LOGITS, history) == 1
    history += [9]  # an id beyond this vocabulary: kept, no logit to penalize
    assert penalized() == {4} and sampler(LOGITS, history) == 1
    assert json.loads(json.dumps(history)) == [4, 4, 9]
    history.clear()
    assert penalized() == set()


def test_the_penalty_costs_the_same_whatever_the_conversation_length():
    """Per token, the sampler reads the distinct ids seen (at most the vocabulary), never the
    whole history, and the history keeps them up to date one token at a time. Counted, not
    timed: how many ids the history touches per new token."""
    sampler = SessionSampler(SamplingParams(repetition_penalty=1.2, seed=1), range(20_000))
    touched = []
    original = TokenHistory._add

    def counting(self, token):
        touched.append(token)
        return original(self, token)

    TokenHistory._add = counting
    try:
        for _ in range(10):
            sampler.next_token(torch.randn(30_000), [7])
    finally:
        TokenHistory._add = original
    assert touched == [7] * 10


def test_a_model_brings_its_own_sampling_defaults_and_the_admin_may_change_them(tmp_path):
    """What a request leaves out: the model's generation_config.json (as vLLM reads it) or
    its GGUF's ``general.sampling.*``, else llama.cpp's defaults; the admin's choice for the
    model (``tiktrue models defaults``) over both, and back."""
    from typer.testing import CliRunner

    from tests.helpers.tiny_gguf import write_llama_gguf
    from tests.helpers.tiny_models import make_tiny_model
    from tiktrue.cli import app
    from tiktrue.model.errors import StoreError
    from tiktrue.model.importer import import_model
    from tiktrue.model.store import GENERATION_CONFIG

    models = tmp_path / "home" / "models"
    source = make_tiny_model(tmp_path / "hf", "llama", num_layers=2)
    plain = import_model(source, "plain", models)
    assert plain.sampling_defaults() == SamplingDefaults()  # it recommends nothing

    own = json.loads((source / GENERATION_CONFIG).read_text())
    own.update(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=-1.0)
    (source / GENERATION_CONFIG).write_text(json.dumps(own))
    hf = import_model(source, "hf", models)
    assert GENERATION_CONFIG in hf.manifest.files  # it travels with the model's copies
    assert hf.sampling_defaults() == SamplingDefaults(temperature=0.6, top_p=0.9)  # -1: ignored

    recommended = {"temp": 0.4, "top_k": 20, "min_p": 0.1, "penalty_repeat": 1.05}
    gguf = write_llama_gguf(source, tmp_path / "tiny.gguf", sampling=recommended)
    store = import_model(gguf, "gguf", models)
    from_gguf = SamplingDefaults(temperature=0.4, top_k=20, min_p=0.1, repetition_penalty=1.05)
    got = store.sampling_defaults()
    assert got.top_k == 20 and got.top_p == SamplingDefaults().top_p
    for name in ("temperature", "min_p", "repetition_penalty"):  # float32 in the file
        assert getattr(got, name) == pytest.approx(getattr(from_gguf, name))

    store.set_admin_sampling({"temperature": 0.0})
    assert store.sampling_defaults().temperature == 0.0 and store.sampling_defaults().top_k == 20
    for bad in ({"top_p": 0}, {"warmth": 1}):
        with pytest.raises(StoreError):
            store.set_admin_sampling(bad)
    assert store.sampling_defaults().temperature == 0.0  # a refusal changed nothing
    store.set_admin_sampling(None)
    assert store.sampling_defaults().temperature == pytest.approx(0.4)

    runner = CliRunner()
    env = {"TIKTRUE_HOME": str(tmp_path / "home")}
    done = runner.invoke(app, ["models", "defaults", "hf", "--min-p", "0.2", "--json"], env=env)
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert shown["min_p"] == 0.2 and shown["temperature"] == 0.6 and shown["set_here"] == ["min_p"]
    refused = runner.invoke(app, ["models", "defaults", "hf", "--top-p", "2"], env=env)
    assert refused.exit_code == 1 and "top_p" in refused.output
    done = runner.invoke(app, ["models", "defaults", "hf", "--reset"], env=env)
    assert "min_p                0.05     (default)" in done.output, done.output
