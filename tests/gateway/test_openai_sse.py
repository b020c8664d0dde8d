"""An answer that fails after its stream started still ends properly: an ``error`` event,
then ``data: [DONE]`` (once the stream was simply cut, with neither)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tiktrue.gateway.chain_client import ChainError
from tiktrue.gateway.openai_api import _sse
from tiktrue.model.generation import GenerationResult, TokenEvent


async def _failing(error: Exception):
    yield TokenEvent(7, " world")
    raise error


def _stream(error: Exception) -> list[str]:
    async def go():
        events = _failing(error)
        first = await anext(events)
        chunks = _sse(first, events, GenerationResult(), "chat", "chatcmpl-1", 0, "m")
        return [chunk async for chunk in chunks]

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ChainError("peer_unavailable", "node 2 is gone"), "peer_unavailable"),
        (RuntimeError("a bug"), "internal_error"),
    ],
)
def test_an_error_after_the_first_token_ends_the_stream_with_an_error_and_done(error, code):
    chunks = _stream(error)
    assert chunks[-1] == "data: [DONE]\n\n"
    data = [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]]
    assert data[1]["choices"][0]["delta"]["content"] == " world"  # the token before the error
    assert data[-1]["error"]["code"] == code and data[-1]["error"]["message"]
