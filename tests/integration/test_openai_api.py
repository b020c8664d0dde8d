"""The gateway's OpenAI-compatible API, driven by the official ``openai`` client."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from tests.helpers.cluster import openai_client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(tiny_cluster) -> OpenAI:
    """The official client with an API key made for an account on the gateway's node."""
    cluster, homes, _ = tiny_cluster
    return openai_client(cluster, homes[0])


def test_models_lists_the_network_model(client, tiny_llama):
    assert [m.id for m in client.models.list().data] == [tiny_llama.model_id]


def test_chat_completion_streams_and_matches_the_non_streamed_answer(client, tiny_llama):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    settings = {"model": tiny_llama.model_id, "temperature": 0, "max_tokens": 12}
    stream = client.chat.completions.create(messages=messages, stream=True, **settings)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = chunks[-1].choices[0].finish_reason
    whole = client.chat.completions.create(messages=messages, **settings)
    assert whole.choices[0].message.content == streamed and streamed
    assert whole.choices[0].finish_reason == finish and whole.usage.prompt_tokens > 5
    # 12 tokens unless the model chose to stop
    tokens = whole.usage.completion_tokens
    assert tokens == 12 if finish == "length" else (finish == "stop" and 0 < tokens < 12)


def test_completions_and_stop_strings(client, tiny_llama):
    free = client.completions.create(
        model=tiny_llama.model_id, prompt="The quick brown", max_tokens=10, temperature=0
    )
    text = free.choices[0].text
    assert text and free.object == "text_completion"
    stop = text[3:6]
    cut = client.completions.create(
        model=tiny_llama.model_id,
        prompt="The quick brown",
        max_tokens=10,
        temperature=0,
        stop=[stop],
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_raw_sse_ends_with_done_and_bad_requests_are_clear(tiny_cluster):
    cluster, _, _ = tiny_cluster
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}
    with httpx.stream("POST", f"{cluster.api_url}/chat/completions", json=body) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"  # sent after an error too: the chunks tell the outcome
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    final = chunks[-1]
    finish, tokens = final["choices"][0]["finish_reason"], final["usage"]["completion_tokens"]
    assert tokens == 3 if finish == "length" else (finish == "stop" and 0 < tokens < 3), final
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    unknown = httpx.post(f"{cluster.api_url}/chat/completions", json={**body, "model": "gpt-9"})
    assert unknown.status_code == 404 and "gpt-9" in unknown.json()["error"]["message"]
    empty = httpx.post(f"{cluster.api_url}/chat/completions", json={"messages": []})
    assert empty.status_code == 400 and "messages" in empty.json()["error"]["message"]


def test_terminal_chat_streams_an_answer_from_the_network(tiny_cluster):
    import subprocess
    import sys

    cluster, _, config = tiny_cluster
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiktrue",
            "chat",
            "--url",
            cluster.api_url,
            "--network",
            config.network_id,
            "--temperature",
            "0",
            "--max-tokens",
            "5",
            "--lang",
            "en",
        ],
        input="Hello there\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = done.stdout.split("model> ", 1)[1].split("\n", 1)[0]
    assert answer.strip(), done.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "tiktrue", "chat", "--url", cluster.api_url, "--network", "nope"],
        input="Hello\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "nope" in wrong.stdout and "error" in wrong.stdout
    # its own words in Persian when asked (the answer is the model's)
    persian = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiktrue",
            "chat",
            "--url",
            cluster.api_url,
            "--lang",
            "fa",
            "--network",
            config.network_id,
            "--max-tokens",
            "3",
        ],
        input="سلام\n/exit\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert persian.returncode == 0, persian.stderr
    assert "گفتگوی TikTrue با" in persian.stdout and "مدل> " in persian.stdout, persian.stdout


@pytest.fixture
def model_defaults(tiny_cluster, tiny_llama):
    """``set(values)``: the admin's sampling defaults for the tiny model on the gateway's PC
    (as ``tiktrue models defaults`` sets them); back to the model's own afterwards."""
    from tiktrue.model.store import BlockStore

    _, homes, _ = tiny_cluster
    store = BlockStore(homes[0] / "models" / tiny_llama.model_id)
    yield store.set_admin_sampling
    store.set_admin_sampling(None)


def test_what_a_request_leaves_out_comes_from_the_model(
    client, tiny_cluster, tiny_llama, model_defaults
):
    """The official client sends only what it is given: the rest is the model's (here set by
    the admin to greedy with a strong repetition penalty, which changes the answer). Over the
    OpenAI API, streamed or not, and over /ws alike."""
    import asyncio

    import websockets

    from tests.helpers.cluster import ask, client_ws_url, request

    cluster, _, config = tiny_cluster
    penalized = {"temperature": 0, "repetition_penalty": 10.0}
    model_defaults(penalized)

    model = tiny_llama.model_id

    def complete(penalty: float | None = None, **settings) -> str:
        extra = {"repetition_penalty": penalty} if penalty is not None else None
        answer = client.completions.create(
            model=model, prompt="The quick brown", max_tokens=24, extra_body=extra, **settings
        )
        return answer.choices[0].text

    explicit = complete(10.0, temperature=0)
    assert explicit != complete(1.0, temperature=0)  # the penalty tells
    assert complete() == complete() == explicit
    hello = [{"role": "user", "content": "Hello there"}]
    stream = client.chat.completions.create(model=model, messages=hello, max_tokens=24, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    chat = client.chat.completions.create(
        model=model,
        messages=hello,
        max_tokens=24,
        temperature=0,
        extra_body={"repetition_penalty": 10.0},
    )
    assert streamed == chat.choices[0].message.content

    async def over_ws(**settings) -> list[dict]:
        async with websockets.connect(client_ws_url(cluster)) as ws:
            body = request(config.network_id, prompt="The quick brown", max_tokens=24, **settings)
            return await ask(ws, body)

    assert asyncio.run(over_ws())[-1]["text"] == asyncio.run(over_ws(**penalized))[-1]["text"]


def test_the_terminal_chat_goes_on_past_the_context(tiny_cluster):
    """Four long questions in `tiktrue chat` on a 512-token network: each is answered (the
    oldest turns are dropped, the system prompt kept), none gets context_length_exceeded."""
    import subprocess
    import sys

    cluster, _, config = tiny_cluster
    words = "tell me more about the quick brown fox and the lazy dog in the garden " * 10
    questions = "".join(f"Question {i}: {words}\n" for i in range(4))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiktrue",
            "chat",
            "--url",
            cluster.api_url,
            "--lang",
            "en",
            "--network",
            config.network_id,
            "--system",
            "Be brief.",
            "--max-tokens",
            "5",
        ],
        input=questions + "/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stdout, done.stdout
    assert done.stdout.count("model> ") == 4


def test_a_request_names_its_priority_class_and_a_wrong_one_is_refused(client, tiny_llama):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    settings = {"model": tiny_llama.model_id, "temperature": 0, "max_tokens": 6}
    plain = client.chat.completions.create(messages=messages, **settings)
    for priority in ("quick", "deep"):  # the official client passes TikTrue's extension on
        classed = client.chat.completions.create(
            messages=messages, extra_body={"priority": priority}, **settings
        )
        assert classed.choices[0].message.content == plain.choices[0].message.content
    wrong = httpx.post(
        str(client.base_url) + "chat/completions",
        json={"messages": messages, "max_tokens": 2, "priority": "urgent"},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=120,
    )
    assert wrong.status_code == 400, wrong.text
    error = wrong.json()["error"]
    assert error["param"] == "priority" and "quick" in error["message"]
