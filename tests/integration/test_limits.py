"""Every bad input a clear error, over both APIs of a real gateway: context limits, sampling
limits, the seed's own example messages as written, bad messages, a cancel read mid-answer.

The tiny model's own context is 512 tokens (its ``max_position_embeddings``), shorter than the
2048 its network's plan reserves, so the network's context length is 512 here.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import websockets

from tests.helpers.cluster import api_key, ask, client_ws_url, openai_client, request, token_ids

pytestmark = pytest.mark.integration
NET = "testnet"
CONTEXT = 512
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)  # > 1000 tokens
HUGE = "Hello world " * 10_000  # 20,000 words: once an HTTP 500 or a stream cut short


@pytest.fixture(scope="module")
def client(tiny_cluster):
    cluster, homes, _ = tiny_cluster
    return openai_client(cluster, homes[0])


def run(coro):
    return asyncio.run(coro)


def test_a_prompt_longer_than_the_context_is_a_400_with_the_numbers(client, tiny_llama):
    model = tiny_llama.model_id
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": LONG}], stream=stream
            )
        error = refused.value.body
        assert refused.value.code == "context_length_exceeded", error
        assert error["context_length"] == CONTEXT and error["prompt_tokens"] > CONTEXT, error
        assert (
            f"{CONTEXT} tokens" in error["message"]
            and str(error["prompt_tokens"]) in (error["message"])
        )
        assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model, prompt=HUGE, max_tokens=5)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.body["param"] == "prompt"


def test_raw_sse_of_a_prompt_too_long_is_a_400_not_a_cut_stream(tiny_cluster):
    cluster, _, _ = tiny_cluster
    body = {"messages": [{"role": "user", "content": HUGE}], "stream": True}
    with httpx.stream("POST", f"{cluster.api_url}/chat/completions", json=body, timeout=120) as r:
        r.read()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_an_answer_stops_at_the_context_and_ws_refuses_with_the_numbers(tiny_cluster):
    cluster, _, _ = tiny_cluster
    prompt = [5 + i % 300 for i in range(CONTEXT - 6)]

    async def go():
        async with websockets.connect(client_ws_url(cluster), max_size=None) as ws:
            fits = await ask(ws, request(NET, input_ids=prompt, temperature=0, max_tokens=100))
            too_long = await ask(ws, request(NET, input_ids=[7] * CONTEXT, message_id="long"))
            huge = await ask(ws, request(NET, prompt=HUGE, message_id="huge"))
            after = await ask(ws, request(NET, input_ids=[5, 6], temperature=0, max_tokens=2))
            return fits, too_long, huge, after

    fits, too_long, huge, after = run(go())
    usage = fits[-1]["usage"]
    assert fits[-1]["status"] == "success", fits[-1]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT
    if fits[-1]["finish_reason"] == "length":  # cut at the context, not at max_tokens
        assert usage["completion_tokens"] == 6, usage
    for refused in (too_long, huge):
        error = refused[-1]
        assert error["header"]["message_type"] == "error", error
        assert error["code"] == "context_length_exceeded", error
        assert f"{CONTEXT} tokens" in error["message"]
        assert error["info"]["context_length"] == CONTEXT
    assert too_long[-1]["info"]["prompt_tokens"] == CONTEXT  # no room left for an answer
    assert huge[-1]["info"]["prompt_tokens"] > 10_000
    assert too_long[-1]["in_reply_to"] == "long" and huge[-1]["in_reply_to"] == "huge"
    assert after[-1]["status"] == "success"


def test_sampling_limits_are_the_same_on_both_apis(client, tiny_cluster, tiny_llama):
    """Temperature above 2 is refused by the OpenAI API and by /ws alike (once accepted up to
    100 on /ws and clamped to 5); 2 itself is accepted by both."""
    cluster, _, _ = tiny_cluster
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=tiny_llama.model_id, messages=messages, temperature=3)
    assert "temperature" in refused.value.body["message"]
    whole = client.chat.completions.create(
        model=tiny_llama.model_id, messages=messages, temperature=2, max_tokens=2
    )
    assert whole.choices[0].finish_reason in ("length", "stop")

    async def go():
        async with websockets.connect(client_ws_url(cluster)) as ws:
            hot = await ask(ws, request(NET, prompt="Hi", temperature=3, message_id="hot"))
            warm = await ask(ws, request(NET, prompt="Hi", temperature=2, max_tokens=2))
            return hot, warm

    hot, warm = run(go())
    assert hot[-1]["code"] == "invalid_message" and "temperature" in hot[-1]["message"]
    assert warm[-1]["status"] == "success"


def seed003_examples() -> dict[str, dict]:
    """Seed 003's example messages, exactly as the seed writes them."""
    return {
        "legacy": {
            "session_id": "session_123",
            "step": 0,
            "input_tensors": {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
        },
        "legacy_test": {"session_id": "test", "step": 0, "input_tensors": {"input_ids": "Hello"}},
        "inference": {
            "header": {
                "message_id": "uuid-here",
                "message_type": "inference_request",
                "protocol_version": "2.0",
                "timestamp": "2024-01-01T12:00:00Z",
                "license_hash": "abc123",
            },
            "model_id": "llama3_1_8b",
            "prompt": "Hello, world!",
            "max_tokens": 100,
            "temperature": 0.7,
        },
        "inference_test": {
            "header": {
                "message_id": "test-123",
                "message_type": "inference_request",
                "protocol_version": "2.0",
                "timestamp": "2024-01-01T12:00:00Z",
            },
            "model_id": "test_model",
            "prompt": "Hello, world!",
        },
        "heartbeat": {
            "header": {
                "message_id": "uuid-here",
                "message_type": "heartbeat",
                "protocol_version": "2.0",
                "timestamp": "2024-01-01T12:00:00Z",
            },
            "worker_id": "model_node_1",
        },
        "authentication": {
            "header": {
                "message_id": "uuid-here",
                "message_type": "authentication",
                "protocol_version": "2.0",
                "timestamp": "2024-01-01T12:00:00Z",
            },
            "license_key": "your-license-key-here",
        },
    }


def seed000_request(network_id: str) -> dict:
    """Seed 000's request shape as written (its "..." filled with token ids)."""
    return {
        "message_type": "inference_request",
        "network_id": network_id,
        "session_id": "session_abc123",
        "timestamp": 1642784400,
        "payload": {
            "input_ids": [101, 203, 200, 5, 17],
            "attention_mask": [1, 1, 1, 1, 1],
            "max_length": 512,
        },
    }


async def shortened(ws, message: dict) -> list[dict]:
    """Send ``message`` as written; once its answer streams, cancel it (the seeds' requests
    ask for up to 512 tokens) and collect the replies up to the final one."""
    await ws.send(json.dumps(message))
    replies = [json.loads(await ws.recv())]
    if replies[0].get("status") == "processing":
        cancel = request(replies[0]["network_id"], message_type="cancel", message_id="c")
        await ws.send(json.dumps({**cancel, "session_id": replies[0]["session_id"]}))
        while replies[-1].get("status") not in ("success", "error"):
            reply = json.loads(await ws.recv())
            if reply["header"]["message_type"] != "ack":
                replies.append(reply)
    return replies


def test_the_seeds_example_messages_as_written_get_proper_answers(tiny_cluster, tiny_llama):
    cluster, homes, _ = tiny_cluster
    examples = seed003_examples()
    key = api_key(homes[0])

    async def go():
        replies = {}
        async with websockets.connect(client_ws_url(cluster), max_size=None) as ws:
            for name in ("legacy", "legacy_test", "inference", "inference_test", "heartbeat"):
                replies[name] = await shortened(ws, examples[name])
            replies["seed000"] = await shortened(ws, seed000_request(NET))
            replies["seed000_other"] = await ask(ws, seed000_request("network_001"))
            # by the model's name, without network_id
            named = {**examples["inference_test"], "model_id": tiny_llama.model_id}
            replies["by_model"] = await shortened(ws, named)
            replies["authentication"] = await ask(ws, examples["authentication"])
            # a wrong key leaves the connection without access, and the connection goes on
            replies["after_bad_key"] = await ask(ws, examples["heartbeat"])
            replies["refused"] = await ask(ws, examples["inference_test"])
        async with websockets.connect(client_ws_url(cluster)) as ws:
            good = {**examples["authentication"], "license_key": key}
            replies["good_key"] = await ask(ws, good)
            replies["with_key"] = await shortened(ws, examples["inference_test"])
        return replies

    replies = run(go())
    for name in ("legacy", "legacy_test", "inference", "inference_test", "seed000", "by_model"):
        final = replies[name][-1]
        assert final["header"]["message_type"] == "inference_response", (name, final)
        assert final["status"] == "success" and final["network_id"] == NET, (name, final)
        assert token_ids(replies[name]) == final["payload"]["output_tokens"], name
    assert replies["inference"][-1]["in_reply_to"] == "uuid-here"
    assert replies["legacy"][-1]["session_id"] == "session_123"
    assert replies["seed000"][-1]["session_id"] == "session_abc123"
    assert replies["seed000"][-1]["payload"]["worker_id"]
    assert replies["heartbeat"][-1]["detail"] == "alive"
    other = replies["seed000_other"][-1]
    assert other["code"] == "wrong_network" and NET in other["message"]
    bad_key = replies["authentication"][-1]
    assert bad_key["code"] == "unauthorized" and bad_key["in_reply_to"] == "uuid-here"
    assert replies["after_bad_key"][-1]["detail"] == "alive"
    assert replies["refused"][-1]["code"] == "unauthorized"
    assert replies["good_key"][-1]["detail"].startswith("authenticated as")
    assert replies["with_key"][-1]["status"] == "success"


def test_bad_messages_get_structured_errors_and_the_connection_goes_on(tiny_cluster):
    cluster, _, _ = tiny_cluster
    heartbeat = json.dumps(seed003_examples()["heartbeat"])
    bad = {
        "binary_json": heartbeat.encode(),  # seed 003's handler reads binary frames as UTF-8
        "binary_garbage": b"\x00\xff\xfe binary",
        "type_object": json.dumps({"message_type": {}}),
        "header_type_object": json.dumps(request(NET, message_type={}, prompt="x")),
        "huge_token": json.dumps(request(NET, input_ids=[10**30])),
        "huge_max_tokens": json.dumps(request(NET, prompt="x", max_tokens=10**30)),
        "huge_seed": json.dumps(request(NET, prompt="x", seed=10**30)),
        "huge_top_k": json.dumps(request(NET, prompt="x", top_k=10**30)),
        "token_beyond_vocab": json.dumps(request(NET, input_ids=[1, 2, 100_000])),
        "float_ids": json.dumps(request(NET, input_ids=[1.5])),
        "list": "[1, 2, 3]",
        "number": "1e400",
    }

    async def go():
        replies = {}
        async with websockets.connect(client_ws_url(cluster)) as ws:
            for name, message in bad.items():
                await ws.send(message)
                replies[name] = json.loads(await ws.recv())
            replies["after"] = await ask(ws, request(NET, input_ids=[5, 6], max_tokens=2))
        return replies

    replies = run(go())
    assert replies.pop("binary_json")["detail"] == "alive"
    assert replies.pop("after")[-1]["status"] == "success"
    for name, reply in replies.items():
        assert reply["header"]["message_type"] == "error", (name, reply)
        assert reply["code"] not in ("internal_error",), (name, reply)
        assert reply["message"], (name, reply)
    assert replies["binary_garbage"]["code"] == "malformed_json"
    assert replies["type_object"]["code"] == "unknown_message_type"
    assert replies["token_beyond_vocab"]["code"] == "invalid_message"
    assert "100000" in replies["token_beyond_vocab"]["message"]
    for name in ("huge_token", "huge_max_tokens", "huge_seed", "huge_top_k", "float_ids"):
        assert replies[name]["code"] == "invalid_message", (name, replies[name])
        assert replies[name]["in_reply_to"] == "m-1", (name, replies[name])


def test_a_cancel_is_read_while_the_answer_streams(tiny_cluster):
    cluster, _, _ = tiny_cluster
    long = request(NET, input_ids=[5, 6, 7], temperature=0, max_tokens=500, session_id="stop-me")
    cancel = request(NET, message_type="cancel", session_id="stop-me", message_id="c-1")

    async def go():
        async with websockets.connect(client_ws_url(cluster)) as ws:
            await ws.send(json.dumps(long))
            replies = [json.loads(await ws.recv())]
            await ws.send(json.dumps(cancel))
            while replies[-1].get("status") != "success":
                replies.append(json.loads(await ws.recv()))
            return replies

    replies = run(go())
    acks = [i for i, r in enumerate(replies) if r["header"]["message_type"] == "ack"]
    assert len(acks) == 1 and replies[acks[0]]["detail"] == "cancelled", replies[-3:]
    assert replies[-1]["finish_reason"] == "cancelled", replies[-1]
    assert len(token_ids(replies)) < 500
