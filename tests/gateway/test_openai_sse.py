"""An answer that fails after its stream started still ends properly: an ``error`` event,
then ``data: [DONE]`` (once the stream was simply cut, with neither)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tiktrue.gateway.errors import ChainError
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


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("probability tensor contains either inf, nan or element < 0"),
        ChainError("internal_error", "RuntimeError('boom') in /srv/tiktrue/engine.py"),
        ChainError("corrupt_block", "corrupted block(s): layer_2 (/home/ada/x/layer_2.st)"),
        ChainError("peer_unavailable", "ConnectionResetError(104, 'reset by peer')"),
    ],
)
def test_no_exception_text_or_server_path_reaches_the_caller(error):
    """What failed on the server is logged there; the caller gets a code and plain words."""
    body = json.loads(_stream(error)[-2].removeprefix("data: "))["error"]
    for leak in ("Error", "/srv", "/home", "tensor", "104"):
        assert leak not in body["message"], body
    if body["code"] == "corrupt_block":
        assert "layer_2" in body["message"]  # which block, not where it lives
