"""Property-based fuzzing of every port a stranger or a member can write to: the gateway's
``/ws``, a block server (with a member's certificate), the control port (without a
certificate, and with a member's).

Hypothesis throws random JSON, random bytes and mutations of valid messages (each field in
turn given a wrong type, a huge number, an empty or long string, or taken away; frames with
bytes flipped or cut). For every message: a reply comes, it is a structured answer or error
(never ``internal_error``), and the connection stays open. Meanwhile a greedy answer runs on
another connection and must come out with the right tokens. Deterministic (derandomized,
no example database) and bounded (a fixed number of examples per port).
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import threading

import pytest
import torch
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.helpers.cluster import client_ws_url, node_connection, request
from tests.integration.test_chain import hello, reference_tokens
from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.node_tls import NetworkCredentials, control_client_context

pytestmark = pytest.mark.integration
NET = "testnet"
CEILING_S = 120.0  # a reply that takes longer is a hang (generous: a busy machine)
# control operations a fuzzer must never name: they change the shared cluster
HARMFUL_OPS = {"leave", "chain_broken", "health_suspect", "reload", "probe", "caps_set"}
# codes a structured error may carry besides the protocol's (model and chain errors)
OTHER_CODES = {
    "bad_shape",
    "bad_positions",
    "unknown_session",
    "session_exists",
    "kv_budget_exceeded",
    "peer_unavailable",
    "engine_error",
    "model_error",
}


def settings_for(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # a failure names its message; no shrinking
        suppress_health_check=list(HealthCheck),
    )


# --- what is thrown ---------------------------------------------------------------------------

NASTY = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        2**31,
        2**63,
        10**30,
        -(10**30),
        1e308,
        -0.0,
        0.5,
        "",
        " ",
        "x" * 300,
        "../../etc/passwd",
        "\u0000",
        "\udcff",
        [],
        {},
        [1, 2],
        {"a": {}},
        [[[[]]]],
    ]
)
KEYS = st.sampled_from(
    [
        "header",
        "message_type",
        "message_id",
        "protocol_version",
        "network_id",
        "session_id",
        "payload",
        "input_ids",
        "step",
        "input_tensors",
        "prompt",
        "temperature",
        "max_tokens",
        "seed",
        "stop",
        "top_k",
        "timestamp",
        "worker_id",
        "license_key",
        "op",
        "id",
        "request",
    ]
)
TEXT = st.text(max_size=12).filter(lambda s: s not in HARMFUL_OPS)
LEAF = st.one_of(NASTY, st.integers(), st.floats(allow_nan=False), TEXT)
JSON = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(KEYS | TEXT, inner, max_size=5)
    ),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every place in a JSON value: (path to it, its value)."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _replace(value, path, new, *, delete=False):
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if delete and not rest:
        del copy[head]
    else:
        copy[head] = _replace(copy[head], rest, new, delete=delete)
    return copy


@st.composite
def mutated(draw, templates: list[dict]):
    """A valid message with one place changed: a nasty value, random JSON, or taken away."""
    message = draw(st.sampled_from(templates))
    paths = list(_paths(message))
    path, _ = draw(st.sampled_from(paths))
    if path and draw(st.booleans()):
        return _replace(message, path, None, delete=True)
    return _replace(message, path, draw(st.one_of(NASTY, JSON)))


def as_text(value) -> str:
    return json.dumps(value)


@st.composite
def mangled_bytes(draw, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, or cut short, or grown."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif draw(st.booleans()):
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def messages(templates: list[dict]):
    """Text and binary messages for a JSON port."""
    return st.one_of(
        JSON.map(as_text),
        mutated(templates).map(as_text),
        mutated(templates).map(lambda m: as_text(m).encode()),
        st.binary(max_size=64),
        st.sampled_from(templates).map(as_text).flatmap(lambda t: mangled_bytes(t.encode())),
    )


# --- how it is thrown -------------------------------------------------------------------------


class Loop:
    """An event loop in a thread: connections live across hypothesis's examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = CEILING_S * 2):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CEILING_S)


@pytest.fixture(scope="module")
def loop():
    running = Loop()
    yield running
    running.close()


async def connect(url: str, **options):
    return await websockets.connect(url, **options)


async def recv(ws) -> dict:
    raw = await asyncio.wait_for(ws.recv(), CEILING_S)
    reply = json.loads(raw)
    assert isinstance(reply, dict), reply
    return reply


def check_protocol_reply(reply: dict, sent) -> None:
    """A structured answer: a protocol message; an error with a known code and a message."""
    kind = reply["header"]["message_type"]
    assert kind in ps.MessageType.__members__, reply
    if kind == "error":
        assert reply["code"] in ps.ERROR_CODES | OTHER_CODES, (reply, sent)
        assert reply["code"] != ps.INTERNAL_ERROR, (reply, sent)
        assert isinstance(reply["message"], str) and reply["message"], reply


ALONGSIDE_PROMPT, ALONGSIDE_TOKENS = [11, 22, 33, 44], 12


@functools.cache
def alongside_reference(store) -> list[int]:
    """The greedy tokens of the one-process engine (it goes on past the end of turn)."""
    return reference_tokens(store, ALONGSIDE_PROMPT, ALONGSIDE_TOKENS)


def alongside(loop: Loop, cluster, store):
    """Greedy answers, one after the other on their own connection, for as long as the
    fuzzing goes on; returns the check that each came out right."""
    stop = threading.Event()

    async def answers() -> list[tuple[list[int], str]]:
        done = []
        async with websockets.connect(client_ws_url(cluster)) as ws:
            body = request(NET, input_ids=ALONGSIDE_PROMPT, temperature=0, max_tokens=12)
            while not stop.is_set() or not done:
                await ws.send(json.dumps(body))
                tokens = []
                while (reply := await recv(ws)).get("status") == "processing":
                    if "token_id" in reply:  # else text held back for a stop string
                        tokens.append(reply["token_id"])
                assert reply.get("status") == "success", reply
                done.append((tokens, reply["finish_reason"]))
        return done

    future = loop.start(answers())

    def check() -> None:
        stop.set()
        done = future.result(CEILING_S * 2)
        expected = alongside_reference(store)  # an answer stops at the end of turn
        for tokens, finish in done:
            assert tokens and tokens == expected[: len(tokens)], (tokens, expected)
            assert len(tokens) == ALONGSIDE_TOKENS if finish == "length" else finish == "stop"

    return check


# --- the gateway's /ws ------------------------------------------------------------------------

WS_TEMPLATES = [
    request(NET, input_ids=[5, 6], max_tokens=2, temperature=0),
    request(NET, prompt="Hi", max_tokens=2, session_id="fuzz-s"),
    request(NET, message_type="cancel", session_id="fuzz-s"),
    request(NET, message_type="session_close", session_id="fuzz-s"),
    request(NET, message_type="heartbeat", worker_id="w1"),
    {"session_id": "fuzz-l", "step": 0, "input_tensors": {"input_ids": [1, 2], "x": [1.5]}},
    {"network_id": NET, "session_id": "fuzz-0", "payload": {"input_ids": [3], "max_length": 2}},
]


@pytest.fixture(scope="module")
def gateway_ws(loop, tiny_cluster, tiny_llama):
    cluster, _, _ = tiny_cluster
    check = alongside(loop, cluster, tiny_llama)
    ws = loop.run(connect(client_ws_url(cluster), max_size=None))
    yield ws
    loop.run(ws.send(json.dumps(WS_TEMPLATES[4])))  # still open after everything
    assert loop.run(recv(ws))["detail"] == "alive"
    loop.run(ws.close())
    check()


async def exchange_ws(ws, message) -> list[dict]:
    """Send; read until the final reply. An answer that streams is cancelled (its session is
    in the reply) so that none runs for long; the ack of that cancel is read too."""
    await ws.send(message)
    replies = [await recv(ws)]
    if replies[0].get("status") in ("processing", "queued"):
        cancel = request(NET, message_type="cancel", session_id=replies[0]["session_id"])
        await ws.send(json.dumps(cancel))
        acks = 0
        while replies[-1].get("status") not in ("success", "error") or not acks:
            reply = await recv(ws)
            if reply["header"]["message_type"] == "ack":
                acks += 1
            else:
                replies.append(reply)
    return replies


@settings_for(120)
@given(message=messages(WS_TEMPLATES))
def test_the_gateway_ws_answers_everything(loop, gateway_ws, message):
    for reply in loop.run(exchange_ws(gateway_ws, message)):
        check_protocol_reply(reply, message)


# --- a block server (a member's certificate) --------------------------------------------------


def _frame(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-(4 + len(text)) % 8)
    return struct.pack(">I", len(text)) + text + payload


FRAME_HEADER = {
    "dtype": "float32",
    "shape": [1, 2, 64],
    "kind": "forward",
    "network_id": NET,
    "session_id": "fuzz-f",
    "message_id": "f-1",
    "start": 0,
    "open": True,
    "tokens": [1, 2],
}
FRAME_PAYLOAD = torch.zeros(1, 2, 64).numpy().tobytes()
NODE_TEMPLATES = [
    request(NET, message_type="heartbeat", node_id="n1"),
    request(NET, message_type="session_open", session_id="fuzz-n"),
    request(NET, message_type="session_close", session_id="fuzz-n"),
    request(NET, prompt="to a node without a gateway"),
]


def node_messages():
    frames = st.one_of(
        mutated([FRAME_HEADER]).map(lambda h: _frame(h, FRAME_PAYLOAD)),
        mangled_bytes(_frame(FRAME_HEADER, FRAME_PAYLOAD)),
    )
    return st.one_of(messages(NODE_TEMPLATES), frames)


@pytest.fixture(scope="module")
def block_server_ws(loop, tiny_cluster, tiny_llama):
    cluster, homes, config = tiny_cluster
    check = alongside(loop, cluster, tiny_llama)
    credentials = NetworkCredentials.load(homes[0], NET)
    middle = config.chain()[1].address
    ws = loop.run(node_connection(middle, credentials.client_context(), hello(credentials)))
    yield ws
    loop.run(ws.send(json.dumps(NODE_TEMPLATES[0])))
    assert loop.run(recv(ws))["header"]["message_type"] == "heartbeat"
    loop.run(ws.close())
    check()


async def exchange(ws, message) -> dict:
    await ws.send(message)
    return await recv(ws)


@settings_for(120)
@given(message=node_messages())
def test_a_block_server_answers_everything(loop, block_server_ws, message):
    check_protocol_reply(loop.run(exchange(block_server_ws, message)), message)


# --- the control port -------------------------------------------------------------------------

CONTROL_TEMPLATES = [
    {"op": "node_info", "id": "c-1"},
    {"op": "ping", "id": "c-2"},
    {"op": "heartbeat", "id": "c-3", "network_id": NET},
    {"op": "health", "id": "c-4", "network_id": NET, "history": 2},
    {"op": "join_status", "id": "c-5", "request_id": "r", "request": {"network_id": NET}},
    {"op": "no_such_op", "id": "c-6"},
]


def check_control_reply(reply: dict, sent) -> None:
    """A structured answer of the control channel: ``ok``; or a code and a message (a
    refusal of a client without the right certificate counts as one)."""
    assert isinstance(reply.get("ok"), bool), (reply, sent)
    if not reply["ok"]:
        assert isinstance(reply.get("code"), str) and reply["code"] != "internal_error", (
            reply,
            sent,
        )
        assert isinstance(reply.get("message"), str) and reply["message"], reply


def _control(loop, tiny_cluster, tiny_llama, member: bool):
    cluster, homes, config = tiny_cluster
    check = alongside(loop, cluster, tiny_llama)
    node = config.chain()[1]
    credentials = NetworkCredentials.load(homes[1], NET) if member else None
    context = control_client_context(credentials)
    ws = loop.run(connect(f"wss://{node.control_address}", ssl=context))
    return ws, check


@pytest.fixture(scope="module")
def control_ws(loop, tiny_cluster, tiny_llama):
    ws, check = _control(loop, tiny_cluster, tiny_llama, member=False)
    yield ws
    loop.run(ws.send(json.dumps(CONTROL_TEMPLATES[1])))
    assert "ok" in loop.run(recv(ws))
    loop.run(ws.close())
    check()


@pytest.fixture(scope="module")
def member_control_ws(loop, tiny_cluster, tiny_llama):
    ws, check = _control(loop, tiny_cluster, tiny_llama, member=True)
    yield ws
    loop.run(ws.send(json.dumps(CONTROL_TEMPLATES[1])))
    assert loop.run(recv(ws))["ok"] is True
    loop.run(ws.close())
    check()


@settings_for(60)
@given(message=messages(CONTROL_TEMPLATES))
def test_the_control_port_answers_a_client_without_a_certificate(loop, control_ws, message):
    check_control_reply(loop.run(exchange(control_ws, message)), message)


@settings_for(60)
@given(message=messages(CONTROL_TEMPLATES))
def test_the_control_port_answers_a_member(loop, member_control_ws, message):
    check_control_reply(loop.run(exchange(member_control_ws, message)), message)
