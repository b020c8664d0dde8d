from __future__ import annotations

import json
import pickle

import pytest

from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.protocol_spec import (
    PROTOCOL_VERSION,
    Ack,
    Authentication,
    Cancel,
    ErrorMessage,
    Header,
    Heartbeat,
    Hello,
    HelloReply,
    InferenceRequest,
    InferenceResponse,
    LegacyRequest,
    LinkLost,
    Message,
    MessageType,
    NodeAuth,
    ProtocolError,
    ProtocolStats,
    SessionClose,
    SessionOpen,
    SessionRestore,
    SessionSave,
    SessionTruncate,
    check_versions,
    error_reply,
    make_message,
    parse_message,
)

SAMPLES: list[Message] = [
    InferenceRequest(
        network_id="net1",
        session_id="s1",
        model_id="llama3_1_8b",
        input_ids=[1, 2, 3],
        attention_mask=[1, 1, 0],
        max_tokens=32,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.1,
        seed=7,
        stop=["\n\n"],
    ),
    InferenceRequest(network_id="net1", session_id="s1", prompt="Hello, world!"),
    InferenceResponse(
        network_id="net1",
        session_id="s1",
        in_reply_to="m-1",
        status="processing",
        token_id=42,
        text=" world",
    ),
    InferenceResponse(
        network_id="net1",
        session_id="s1",
        in_reply_to="m-1",
        status="success",
        finish_reason="stop",
        usage={"prompt_tokens": 3, "completion_tokens": 5},
    ),
    Heartbeat(worker_id="model_node_1", cpu_percent=12.5, active_sessions=2),
    Authentication(license_key="secret-key", node_id="n1"),
    Authentication(token="tok"),
    ErrorMessage(code="invalid_message", message="bad", in_reply_to="m-1", session_id="s1"),
    Hello(node_id="n1", network_id="net1", software_version="0.1.0", role="worker"),
    HelloReply(node_id="n2", network_id="net1", in_reply_to="m-1"),
    HelloReply(node_id="n2", network_id="net1", in_reply_to="m-1", auth_nonce="ab" * 32),
    NodeAuth(proof="30" * 70),
    SessionOpen(network_id="net1", session_id="s1", model_id="m"),
    SessionClose(network_id="net1", session_id="s1"),
    SessionSave(network_id="net1", session_id="s1"),
    SessionRestore(network_id="net1", session_id="s1"),
    SessionTruncate(network_id="net1", session_id="s1", length=12),
    Cancel(network_id="net1", session_id="s1"),
    Ack(in_reply_to="m-1", session_id="s1", info={"cached_tokens": 12}),
    LinkLost(network_id="net1", node_id="n2", peer="127.0.0.1:9002"),
]


def _header(message_type: str = "inference_request", **extra: object) -> dict[str, object]:
    return {
        "message_id": "m-1",
        "message_type": message_type,
        "protocol_version": PROTOCOL_VERSION,
        "timestamp": "2024-01-01T12:00:00Z",
        **extra,
    }


def _error(raw: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_message(raw)  # type: ignore[arg-type]
    return info.value


def test_every_message_type_has_a_model() -> None:
    assert set(ps.MESSAGE_MODELS) == set(MessageType)
    assert {type(m) for m in SAMPLES} == set(ps.MESSAGE_MODELS.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    text = make_message(message)
    parsed = parse_message(text)
    assert parsed.kind == "protocol"
    assert parsed.message == message
    assert parsed.message_id == message.header.message_id
    assert parsed.message_type == message.message_type
    assert parse_message(text.encode("utf-8")).message == message
    assert parse_message(json.loads(text)).message == message


def test_constructed_message_gets_header_of_its_type() -> None:
    hb = Heartbeat(node_id="n1")
    assert hb.header.message_type is MessageType.heartbeat
    assert hb.header.protocol_version == "2.0"
    assert hb.header.timestamp.tzinfo is not None
    assert hb.worker_id == "n1"
    assert Heartbeat(node_id="n1").message_id != hb.message_id
    with pytest.raises(ValueError):
        Heartbeat(header=Header(message_type=MessageType.ack), node_id="n1")


def test_seed003_standard_request_detected() -> None:
    raw = {
        "header": _header(license_hash="abc123"),
        "network_id": "net1",
        "session_id": "s1",
        "model_id": "llama3_1_8b",
        "prompt": "Hello, world!",
        "max_tokens": 100,
        "temperature": 0.7,
    }
    parsed = parse_message(json.dumps(raw))
    assert parsed.kind == "protocol"
    req = parsed.message
    assert isinstance(req, InferenceRequest)
    assert (req.prompt, req.max_tokens, req.temperature) == ("Hello, world!", 100, 0.7)
    assert req.header.license_hash == "abc123"
    assert parsed.network_id == "net1" and parsed.session_id == "s1"


def test_seed000_shape_detected_and_normalised() -> None:
    raw = {
        "message_type": "inference_request",
        "network_id": "network_001",
        "session_id": "session_abc123",
        "timestamp": 1642784400,
        "payload": {"input_ids": [101, 2023, 2003], "attention_mask": [1, 1, 1], "max_length": 512},
    }
    parsed = parse_message(json.dumps(raw))
    assert parsed.kind == "seed000"
    req = parsed.message
    assert isinstance(req, InferenceRequest)
    assert req.input_ids == [101, 2023, 2003]
    assert req.attention_mask == [1, 1, 1]
    assert req.max_tokens == 512
    assert req.network_id == "network_001" and req.session_id == "session_abc123"
    assert req.header.timestamp.timestamp() == 1642784400
    assert req.header.message_type is MessageType.inference_request
    # normalised to a 2.0 message that parses back as one
    assert parse_message(make_message(req)).message == req


def test_seed000_without_message_type_and_with_message_id() -> None:
    raw = {"network_id": "n", "session_id": "s", "message_id": "abc", "payload": {"input_ids": [5]}}
    parsed = parse_message(raw)
    assert parsed.kind == "seed000" and parsed.message_id == "abc"


def test_seed000_errors() -> None:
    err = _error({"network_id": "n", "session_id": "s", "message_id": "x", "payload": [1]})
    assert (err.code, err.message_id, err.session_id) == ("invalid_message", "x", "s")
    err = _error({"network_id": "n", "message_type": "heartbeat", "payload": {}})
    assert err.code == "unknown_message_type"
    err = _error({"network_id": "n", "session_id": "s", "payload": {"max_length": 5}})
    assert err.code == "invalid_message" and "input_ids" in err.message


def test_legacy_shape_detected() -> None:
    raw = {
        "session_id": "session_123",
        "step": 0,
        "input_tensors": {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
    }
    parsed = parse_message(json.dumps(raw))
    assert parsed.kind == "legacy"
    legacy = parsed.message
    assert isinstance(legacy, LegacyRequest)
    assert legacy.input_tensors.input_ids == [1, 2, 3]
    assert parsed.message_id is None
    assert parsed.message_type is MessageType.inference_request
    assert parse_message(make_message(legacy)).message == legacy
    # seed 003's own legacy test sends text, and later steps may carry other tensors
    text = parse_message({"session_id": "test", "step": 0, "input_tensors": {"input_ids": "Hello"}})
    assert text.message.input_tensors.input_ids == "Hello"  # type: ignore[union-attr]
    extra = {"session_id": "t", "step": 3, "input_tensors": {"hidden_states": [[0.5]]}}
    assert parse_message(extra).message.input_tensors.hidden_states == [[0.5]]  # type: ignore[union-attr]


def test_legacy_missing_step() -> None:
    err = _error({"session_id": "s", "input_tensors": {}})
    assert err.code == "invalid_message" and "step" in err.message and err.session_id == "s"


def test_malformed_json() -> None:
    assert _error('{"header": ').code == "malformed_json"
    assert _error(b"\xff\xfe").code == "malformed_json"
    assert _error('{"x": NaN}').code == "malformed_json"


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "3", "null"])
def test_non_object_json(raw: str) -> None:
    err = _error(raw)
    assert err.code == "invalid_message" and err.message_id is None


def test_unrecognised_shape() -> None:
    err = _error({"hello": 1, "message_id": "q"})
    assert err.code == "invalid_message" and err.message_id == "q"
    assert _error({"message_type": "bogus"}).code == "unknown_message_type"


def test_unknown_message_type_carries_message_id() -> None:
    err = _error({"header": _header("teleport"), "session_id": "s1"})
    assert err.code == "unknown_message_type"
    assert err.message_id == "m-1" and err.session_id == "s1"
    assert "teleport" in err.message


def test_missing_required_field_carries_message_id() -> None:
    err = _error({"header": _header(), "session_id": "s1"})
    assert err.code == "invalid_message"
    assert err.message_id == "m-1"
    assert "prompt or input_ids" in err.message


@pytest.mark.parametrize(
    "body",
    [
        {"network_id": "net1", "session_id": "s1"},  # neither prompt nor input_ids
        {"network_id": "net1", "session_id": "s1", "input_ids": [1, -2]},
        {"network_id": "net1", "session_id": "s1", "input_ids": [1, True]},
        {"network_id": "net1", "session_id": "s1", "input_ids": [1], "attention_mask": [1, 1]},
        {"network_id": "net1", "session_id": "s1", "prompt": "x", "top_p": 0},
        {"network_id": "net1", "session_id": "s1", "prompt": "x", "max_tokens": 0},
        {"network_id": "../etc", "session_id": "s1", "prompt": "x"},
        {"network_id": "net1", "session_id": "a/b", "prompt": "x"},
        {"network_id": "net1", "session_id": "s1", "prompt": "x", "priority": "urgent"},
        {"network_id": "net1", "session_id": "s1", "prompt": "x", "priority": 0},
    ],
)
def test_invalid_request_bodies(body: dict[str, object]) -> None:
    err = _error({"header": _header(), **body})
    assert err.code == "invalid_message" and err.message_id == "m-1"


def test_validation_message_does_not_echo_credentials() -> None:
    raw = {"header": _header("authentication"), "license_key": "TOP-SECRET", "node_id": "bad id!"}
    err = _error(raw)
    assert err.code == "invalid_message"
    assert "TOP-SECRET" not in err.message and "node_id" in err.message
    assert "TOP-SECRET" not in repr(Authentication(license_key="TOP-SECRET"))


@pytest.mark.parametrize("version", ["1.0", "3.0", "two", "", 2])
def test_unsupported_protocol_version(version: object) -> None:
    err = _error({"header": _header("heartbeat", protocol_version=version), "node_id": "n1"})
    assert err.code == "unsupported_protocol_version"
    assert err.message_id == "m-1"


def test_protocol_minor_version_accepted_and_missing_version_refused() -> None:
    parsed = parse_message({"header": _header("heartbeat", protocol_version="2.1"), "node_id": "a"})
    assert parsed.message.header.protocol_version == "2.1"  # type: ignore[union-attr]
    header = _header("heartbeat")
    del header["protocol_version"]
    err = _error({"header": header, "node_id": "a"})
    assert err.code == "invalid_message" and err.message_id == "m-1"


def test_header_not_an_object() -> None:
    err = _error({"header": "x", "session_id": "s1"})
    assert err.code == "invalid_message" and err.session_id == "s1"


def test_max_bytes() -> None:
    text = make_message(SAMPLES[1])
    assert parse_message(text, max_bytes=len(text)).kind == "protocol"
    with pytest.raises(ProtocolError) as info:
        parse_message(text, max_bytes=len(text) - 1)
    assert info.value.code == "frame_too_large"


def test_error_reply() -> None:
    err = _error({"header": _header("teleport"), "session_id": "s1"})
    reply = error_reply(err, network_id="net1")
    assert reply["header"]["message_type"] == "error"
    assert reply["header"]["protocol_version"] == PROTOCOL_VERSION
    assert reply["code"] == "unknown_message_type"
    assert reply["in_reply_to"] == "m-1"
    assert reply["session_id"] == "s1" and reply["network_id"] == "net1"
    parsed = parse_message(json.dumps(reply))
    assert isinstance(parsed.message, ErrorMessage) and parsed.message.message == err.message
    reply = error_reply(ProtocolError("wrong_network", "not this network"))
    assert "in_reply_to" not in reply


def test_protocol_error_basics() -> None:
    err = ProtocolError("bad_tensor", "oops", "m-1", "s1")
    assert str(err) == "bad_tensor: oops"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message, copy.message_id, copy.session_id) == (
        "bad_tensor",
        "oops",
        "m-1",
        "s1",
    )
    for code in ("malformed_json", "wrong_network", "frame_too_large", "version_mismatch"):
        assert code in ps.ERROR_CODES


def test_protocol_stats() -> None:
    stats = ProtocolStats()
    assert stats.protocol_percentage == 0.0
    stats.record(parse_message(make_message(SAMPLES[0])))
    stats.record(
        parse_message({"network_id": "n", "session_id": "s", "payload": {"input_ids": [1]}})
    )
    stats.record(parse_message({"session_id": "s", "step": 0, "input_tensors": {}}))
    stats.record(parse_message({"session_id": "s", "step": 1, "input_tensors": {}}))
    stats.record_error()
    assert stats.as_dict() == {
        "total_requests": 4,
        "legacy_requests": 2,
        "protocol_requests": 2,
        "errors": 1,
        "protocol_percentage": 50.0,
    }


def test_check_versions_accepts_equal_and_patch_difference() -> None:
    check_versions("0.1.0", "2.0", "0.1.0", "2.0")
    check_versions("0.1.0", "2.0", "0.1.3", "2.1")


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        (("0.1.0", "2.0"), ("0.2.0", "2.0")),
        (("1.1.0", "2.0"), ("0.1.0", "2.0")),
        (("0.1.0", "2.0"), ("0.1.0", "3.0")),
        (("0.1.0", "2.0"), ("garbage", "2.0")),
    ],
)
def test_check_versions_refuses_mismatch(local: tuple[str, str], remote: tuple[str, str]) -> None:
    with pytest.raises(ProtocolError) as info:
        check_versions(*local, *remote)
    err = info.value
    assert err.code == "version_mismatch"
    for version in (*local, *remote):
        assert version in err.message


def test_hello_defaults_to_this_software() -> None:
    from tiktrue import __version__

    hello = Hello(node_id="n1", network_id="net1")
    assert hello.software_version == __version__
    assert hello.protocol_version == PROTOCOL_VERSION


def test_a_request_names_its_priority_class_or_leaves_it_to_its_key() -> None:
    for priority in ("quick", "normal", "deep"):
        raw = {"header": _header(), "network_id": "n", "prompt": "x", "priority": priority}
        assert parse_message(json.dumps(raw)).message.priority == priority
    raw = {"header": _header(), "network_id": "n", "prompt": "x"}
    assert parse_message(json.dumps(raw)).message.priority is None
