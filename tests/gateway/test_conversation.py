"""The prompt of a turn and the model's window of a long conversation, as pure functions
(``gateway/conversation.py``), on the tiny model's real tokenizer."""

from __future__ import annotations

import pytest

from tiktrue.gateway.conversation import common_prefix, conversation_ids, rewinds, window
from tiktrue.gateway.errors import ChainError
from tiktrue.model.tokenizer import load_tokenizer, prompt_ids
from tiktrue.protocol import protocol_spec as ps


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


def _talk(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are brief."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question number {i} about the sea?"})
        messages.append({"role": "assistant", "content": f"Answer number {i}: waves and salt."})
    return messages


def test_a_conversation_that_fits_is_seen_whole_from_its_window_start(tokenizer):
    messages = _talk(3)
    prompt = window(tokenizer, messages, 0, room=8, context=10_000)
    assert prompt.ids == prompt_ids(tokenizer, messages)
    assert prompt.window_start == 1 and not prompt.shifted  # the first user message


def test_a_long_conversation_drops_its_oldest_turns_and_keeps_the_system_prompt(tokenizer):
    messages = _talk(12)
    whole = len(prompt_ids(tokenizer, messages))
    context, room = whole // 2, 16
    prompt = window(tokenizer, messages, 0, room, context)
    assert prompt.shifted and messages[prompt.window_start]["role"] == "user"
    assert prompt.ids == prompt_ids(tokenizer, messages[:1] + messages[prompt.window_start :])
    assert len(prompt.ids) <= context // 2  # room for the next turns before the next shift
    # the next turn continues the same window (its prompt is not computed again)
    longer = [*messages, {"role": "user", "content": "And the tides?"}]
    after = window(tokenizer, longer, prompt.window_start, room, context)
    assert after.window_start == prompt.window_start and not after.shifted
    assert after.ids[: len(prompt.ids) - 8] == prompt.ids[: len(prompt.ids) - 8]


def test_input_ids_outside_the_vocabulary_are_refused(tokenizer):
    with pytest.raises(ChainError) as refused:
        conversation_ids(
            tokenizer,
            messages=None,
            windowed=False,
            text=None,
            input_ids=[1, 10**6],
            held=[],
            window_start=0,
            room=8,
            context_length=64,
            vocab_size=300,
        )
    assert refused.value.code == ps.INVALID_MESSAGE and "1000000" in refused.value.message


def test_a_changed_or_regenerated_turn_rewinds_to_the_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert rewinds([1, 2, 3], [1, 2, 4])  # edited
    assert rewinds([1, 2, 3], [1, 2, 3])  # regenerated: nothing new to run
    assert not rewinds([1, 2, 3], [1, 2, 3, 4])  # goes on
