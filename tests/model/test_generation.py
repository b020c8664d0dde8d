"""The token loop: chat template, streaming, stop strings, max tokens, resume."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.helpers.tiny_models import reference_model
from tiktrue.model.engine import BlockEngine, split_evenly
from tiktrue.model.generation import GenerationResult, LocalChain, _split_at_stop, stream_tokens
from tiktrue.model.sampling import SamplingParams
from tiktrue.model.tokenizer import load_tokenizer, prompt_ids, stop_token_ids


@pytest.fixture(scope="module")
def chain_and_tokenizer(tiny_llama):
    engines = [
        BlockEngine(tiny_llama, s) for s in split_evenly(tiny_llama.manifest.model_chain_order, 3)
    ]
    return LocalChain(engines), load_tokenizer(tiny_llama)


def stream(chain, tokenizer, prompt, params, session, result, **options):
    """The token stream of one answer on an open session."""
    options.setdefault("stop_ids", set())
    return stream_tokens(
        chain, prompt, params, tokenizer=tokenizer, session_id=session, result=result, **options
    )


def collect(chain, tokenizer, prompt, params, session, *, stop_ids=frozenset(), start=0):
    """Run one answer on an open session; returns (events, result)."""
    result = GenerationResult()

    async def go():
        answer = stream(
            chain, tokenizer, prompt, params, session, result, stop_ids=set(stop_ids), start=start
        )
        return [event async for event in answer]

    return asyncio.run(go()), result


def run(chain, tokenizer, prompt, params, session, stop_ids=frozenset()):
    chain.open(session)
    try:
        return collect(chain, tokenizer, prompt, params, session, stop_ids=stop_ids)
    finally:
        chain.close(session)


def test_streamed_text_is_the_decoded_answer_and_matches_transformers(
    chain_and_tokenizer, tiny_llama
):
    chain, tokenizer = chain_and_tokenizer
    prompt = prompt_ids(tokenizer, "What is the capital of France?")
    assert tokenizer.decode(prompt).startswith("<|im_start|>user\nWhat is")
    events, result = run(
        chain, tokenizer, prompt, SamplingParams(temperature=0, max_tokens=20), "g"
    )
    assert "".join(e.text for e in events) == result.text
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert len(result.token_ids) == 20 and result.finish_reason == "length"
    expected = (
        reference_model(tiny_llama)
        .generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[
            0, len(prompt) :
        ]
        .tolist()
    )
    assert result.token_ids == expected


def test_eos_and_stop_strings_end_the_answer(chain_and_tokenizer):
    chain, tokenizer = chain_and_tokenizer
    prompt = prompt_ids(tokenizer, "Hello")
    _, free = run(chain, tokenizer, prompt, SamplingParams(temperature=0, max_tokens=12), "a")
    first = free.token_ids[3]
    _, eos = run(
        chain,
        tokenizer,
        prompt,
        SamplingParams(temperature=0, max_tokens=12),
        "b",
        stop_ids={first},
    )
    assert eos.token_ids == free.token_ids[:3] and eos.finish_reason == "stop"
    stop = free.text[len(free.text) // 2 :][:3]
    events, cut = run(chain, tokenizer, prompt, SamplingParams(temperature=0, stop=[stop]), "c")
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert stop not in "".join(e.text for e in events)


def test_split_at_stop_holds_back_a_possible_beginning():
    assert _split_at_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert _split_at_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert _split_at_stop("abc", []) == ("abc", "", False)


def test_seeded_sampling_repeats(chain_and_tokenizer):
    chain, tokenizer = chain_and_tokenizer
    prompt = prompt_ids(tokenizer, "Hello")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=15)
    _, one = run(chain, tokenizer, prompt, params, "x")
    _, two = run(chain, tokenizer, prompt, params, "y")
    assert one.token_ids == two.token_ids


def test_second_turn_sends_only_new_tokens(chain_and_tokenizer, tiny_llama):
    """A kept session continues from its cache and equals recomputing the whole conversation."""
    chain, tokenizer = chain_and_tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=6)
    first = prompt_ids(tokenizer, "Hello")
    chain.open("kept")
    _, turn1 = collect(chain, tokenizer, first, greedy, "kept")
    held = len(first) + len(turn1.token_ids) - 1  # the last sampled token is not in the cache yet
    more = [turn1.token_ids[-1], *prompt_ids(tokenizer, "again", raw=True)]
    _, turn2 = collect(chain, tokenizer, more, greedy, "kept", start=held)
    chain.close("kept")
    whole = first + turn1.token_ids + more[1:]
    _, recomputed = run(chain, tokenizer, whole, greedy, "fresh")
    assert turn2.token_ids == recomputed.token_ids


def test_stop_ids_come_from_config_and_tokenizer(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tiny_llama, tokenizer)


def _cache_lengths(chain, session):
    return {engine.session_length(session) for engine in chain.engines}


def test_the_step_already_running_when_a_stop_string_ends_the_answer_is_counted(
    chain_and_tokenizer,
):
    """Each token goes back into the chain before its text is checked; when a stop string
    ends the answer, that step still completes and ``decode_steps`` says the caches hold it."""
    chain, tokenizer = chain_and_tokenizer
    prompt = prompt_ids(tokenizer, "Hello")
    _, free = run(chain, tokenizer, prompt, SamplingParams(temperature=0, max_tokens=16), "f")
    stop = free.text[len(free.text) // 2 :][:3]
    chain.open("s")
    _, cut = collect(chain, tokenizer, prompt, SamplingParams(temperature=0, stop=[stop]), "s")
    assert cut.finish_reason == "stop" and len(cut.token_ids) < len(free.token_ids)
    assert cut.decode_steps == len(cut.token_ids)  # the stopping token was fed too
    assert _cache_lengths(chain, "s") == {len(prompt) + cut.decode_steps}
    chain.close("s")


def test_a_cancel_or_a_closed_stream_leaves_the_caches_as_counted(chain_and_tokenizer):
    chain, tokenizer = chain_and_tokenizer
    prompt = prompt_ids(tokenizer, "Hello")
    params = SamplingParams(temperature=0, max_tokens=16)

    chain.open("c")
    result = GenerationResult()

    async def cancelled_after_three():
        events = []
        answer = stream(
            chain, tokenizer, prompt, params, "c", result, should_stop=lambda: len(events) >= 3
        )
        async for event in answer:
            events.append(event)
        return events

    asyncio.run(cancelled_after_three())
    assert result.finish_reason == "cancelled" and len(result.token_ids) == 3
    assert _cache_lengths(chain, "c") == {len(prompt) + result.decode_steps}
    chain.close("c")

    chain.open("d")
    closed = GenerationResult()

    async def consumer_walks_away():
        answer = stream(chain, tokenizer, prompt, params, "d", closed)
        async for _ in answer:
            if len(closed.token_ids) == 2:
                break
        await answer.aclose()
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(consumer_walks_away()) == []  # nothing left running
    assert closed.decode_steps == 2
    assert _cache_lengths(chain, "d") == {len(prompt) + closed.decode_steps}
    chain.close("d")


def test_streamed_text_never_splits_a_multi_byte_character(tiny_llama):
    """Byte-level tokens cut Persian letters and emoji into pieces; the stream holds a piece
    back until its character is whole, so no delta shows a replacement character."""
    from tiktrue.model.tokenizer import IncrementalDecoder

    tokenizer = load_tokenizer(tiny_llama)
    for text in ["سلام! پایتخت ایران تهران است.", "Emoji 😀🎉 and naïve café, 日本語"]:
        ids = tokenizer.encode(text)
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.push(token) for token in ids] + [decoder.flush()]
        assert "".join(deltas) == text
        assert not [d for d in deltas if "\ufffd" in d]
        assert "" in deltas[:-1]  # some tokens ended inside a character (held back)
