"""Every message of the TikTrue wire protocol (DESIGN.md §4) and its validation.

Three shapes arrive on a worker's WebSocket and are told apart by :func:`parse_message`:

- **protocol** 2.0: ``{"header": {message_id, message_type, protocol_version, timestamp,
  license_hash?}, ...body}`` with the body fields at top level (seed 003);
- **seed000**: ``{"message_type"?, "network_id", "session_id", "timestamp"?, "payload":
  {"input_ids", "attention_mask", "max_length"}}`` (phase 7 of seed 000), an inference request
  only, normalised into :class:`InferenceRequest`;
- **legacy**: ``{"session_id", "step", "input_tensors": {...}}`` (seed 003), no header.

Text frames carry these JSON messages; tensors travel in binary frames (``frames``). Any problem
raises :class:`ProtocolError`, which :func:`error_reply` turns into the standard ``error`` message.
Unknown fields are ignored, so a peer on a newer 2.x minor version can add fields.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tiktrue import __version__ as SOFTWARE_VERSION
from tiktrue import limits
from tiktrue.limits import (
    MaxTokens,
    MinP,
    Priority,
    RepetitionPenalty,
    Seed,
    StopStrings,
    Temperature,
    TokenId,
    TopK,
    TopP,
)

PROTOCOL_VERSION = "2.0"

# Error codes (the ``code`` of ProtocolError and of the ``error`` message).
MALFORMED_JSON = "malformed_json"  # not UTF-8, not JSON, NaN/Infinity
UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
INVALID_MESSAGE = "invalid_message"  # right type, wrong or missing fields, unknown shape
UNSUPPORTED_PROTOCOL_VERSION = "unsupported_protocol_version"
WRONG_NETWORK = "wrong_network"  # raised by callers: the request names another network
FRAME_TOO_LARGE = "frame_too_large"
BAD_TENSOR = "bad_tensor"  # a binary tensor frame that does not decode
VERSION_MISMATCH = "version_mismatch"  # hello: protocol major or software major.minor differ
UNAUTHORIZED = "unauthorized"  # raised by callers: bad or missing credentials
SESSION_NOT_FOUND = "session_not_found"  # raised by callers: no such session on this node
INTERNAL_ERROR = "internal_error"  # raised by callers: a bug on the answering side
FORBIDDEN = "forbidden"  # raised by callers: valid credentials that do not reach this
RATE_LIMITED = "rate_limited"  # raised by callers: over a request limit; retry later
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the prompt does not fit the network
AUTH_FAILED = "auth_failed"  # a node's challenge answer did not verify (or never came)

ERROR_CODES = frozenset(
    {
        MALFORMED_JSON,
        UNKNOWN_MESSAGE_TYPE,
        INVALID_MESSAGE,
        UNSUPPORTED_PROTOCOL_VERSION,
        WRONG_NETWORK,
        FRAME_TOO_LARGE,
        BAD_TENSOR,
        VERSION_MISMATCH,
        UNAUTHORIZED,
        SESSION_NOT_FOUND,
        INTERNAL_ERROR,
        FORBIDDEN,
        RATE_LIMITED,
        CONTEXT_LENGTH_EXCEEDED,
        AUTH_FAILED,
    }
)

# IDs end up in file names (KV cache spill, saved sessions): letters, digits, _ . - only,
# starting with a letter or digit, so "..", "/" and ":" can never reach a path.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
MessageId = Annotated[str, Field(min_length=1, max_length=128)]
HexBytes = Annotated[str, Field(pattern=r"^[0-9a-f]{2,256}$")]  # nonces, signatures


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` is one of the error-code constants."""

    def __init__(
        self,
        code: str,
        message: str,
        message_id: str | None = None,
        session_id: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, message_id, session_id)
        self.code = code
        self.message = message
        self.message_id = message_id
        self.session_id = session_id
        self.info = info  # the numbers behind the refusal (e.g. context length, prompt tokens)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class MessageType(str, Enum):
    """The ``header.message_type`` values."""

    inference_request = "inference_request"
    inference_response = "inference_response"  # streamed: one per token, then success/error
    heartbeat = "heartbeat"
    authentication = "authentication"
    error = "error"
    session_open = "session_open"  # allocate a KV cache for a session on every chain node
    session_close = "session_close"  # free a session's KV cache
    session_save = "session_save"  # write a session's KV cache to disk
    session_restore = "session_restore"  # load a saved session's KV cache from disk
    session_truncate = "session_truncate"  # forget a session's positions from ``length`` on
    cancel = "cancel"  # stop a session's running generation
    hello = "hello"  # first message on a connection: who I am, my versions
    hello_reply = "hello_reply"  # the answer to hello when the versions agree
    ack = "ack"  # generic success answer to a control message
    link_lost = "link_lost"  # to a chain's first node: a link further down the chain dropped
    node_auth = "node_auth"  # after hello: the connecting node's answer to the challenge


class Header(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_id: MessageId = Field(default_factory=lambda: str(uuid.uuid4()))
    message_type: MessageType
    protocol_version: str = PROTOCOL_VERSION
    timestamp: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    license_hash: str | None = None


class Message(BaseModel):
    """Base of the 2.0 messages: a header plus body fields at top level.

    Built without a header (``Heartbeat(node_id="a")``), a message gets a fresh one of its type.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    message_type: ClassVar[MessageType]

    header: Header

    @model_validator(mode="before")
    @classmethod
    def _fill_header(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            header = data.get("header")
            if header is None:
                data = {**data, "header": {"message_type": cls.message_type}}
            elif isinstance(header, Mapping) and "message_type" not in header:
                data = {**data, "header": {**header, "message_type": cls.message_type}}
        return data

    @model_validator(mode="after")
    def _check_type(self) -> Message:
        if self.header.message_type != self.message_type:
            raise ValueError(
                f"header.message_type is {self.header.message_type.value!r}, "
                f"expected {self.message_type.value!r}"
            )
        return self

    @property
    def message_id(self) -> str:
        return self.header.message_id


class InferenceRequest(Message):
    """Generate from ``prompt`` (tokenized by the gateway) or from ``input_ids``."""

    message_type: ClassVar[MessageType] = MessageType.inference_request

    # None: the gateway's network when it serves one, else the one ``model_id`` names
    network_id: Identifier | None = None
    session_id: Identifier | None = None  # None: a one-off answer in a fresh session
    model_id: str | None = Field(None, max_length=200)
    prompt: str | None = None
    input_ids: list[TokenId] | None = Field(None, max_length=limits.MAX_INPUT_TOKENS)
    attention_mask: list[Literal[0, 1]] | None = Field(None, max_length=limits.MAX_INPUT_TOKENS)
    # sampling: the bounds of ``tiktrue.limits``, as in the OpenAI API; a field left out (or
    # null) takes the model's own default
    max_tokens: MaxTokens = limits.DEFAULT_MAX_TOKENS
    temperature: Temperature | None = None  # 0 = greedy
    top_k: TopK | None = None  # 0 = off
    top_p: TopP | None = None
    min_p: MinP | None = None  # 0 = off
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: StopStrings = Field(default_factory=list)
    stream: bool = True
    # quick / normal / deep; None: the API key's or account's default, else normal
    priority: Priority | None = None

    @model_validator(mode="after")
    def _check_inputs(self) -> InferenceRequest:
        if self.prompt is None and self.input_ids is None:
            raise ValueError("either prompt or input_ids is required")
        if self.attention_mask is not None and (
            self.input_ids is None or len(self.attention_mask) != len(self.input_ids)
        ):
            raise ValueError("attention_mask must have one entry per input_ids entry")
        return self


class InferenceResponse(Message):
    """One streamed step (``processing``, ``text`` is the new text only) or the final one;
    ``queued`` (before any step) says the request waits for the network to heal."""

    message_type: ClassVar[MessageType] = MessageType.inference_response

    network_id: Identifier
    session_id: Identifier
    in_reply_to: MessageId
    status: Literal["queued", "processing", "success", "error"]
    token_id: TokenId | None = None
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    usage: dict[str, Any] | None = None
    # the final answer in seed 000's words: output_tokens, processing_time (s), worker_id
    payload: dict[str, Any] | None = None


class Heartbeat(Message):
    """Liveness and load of a node; ``worker_id`` (seed 003) and ``node_id`` are synonyms."""

    message_type: ClassVar[MessageType] = MessageType.heartbeat

    node_id: Identifier | None = None
    worker_id: Identifier | None = None
    network_id: Identifier | None = None
    cpu_percent: float | None = Field(None, ge=0.0, le=100.0)
    ram_percent: float | None = Field(None, ge=0.0, le=100.0)
    gpu_percent: float | None = Field(None, ge=0.0, le=100.0)
    active_sessions: int | None = Field(None, ge=0)
    queue_depth: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _same_node(self) -> Heartbeat:
        if self.node_id is None and self.worker_id is None:
            raise ValueError("node_id (or worker_id) is required")
        if self.node_id is None:
            self.node_id = self.worker_id
        elif self.worker_id is None:
            self.worker_id = self.node_id
        return self


class Authentication(Message):
    message_type: ClassVar[MessageType] = MessageType.authentication

    license_key: str | None = Field(None, min_length=1, repr=False)
    token: str | None = Field(None, min_length=1, repr=False)
    node_id: Identifier | None = None
    network_id: Identifier | None = None

    @model_validator(mode="after")
    def _has_credential(self) -> Authentication:
        if self.license_key is None and self.token is None:
            raise ValueError("license_key or token is required")
        return self


class ErrorMessage(Message):
    message_type: ClassVar[MessageType] = MessageType.error

    code: str
    message: str
    in_reply_to: MessageId | None = None  # the offending message's message_id, when readable
    session_id: str | None = None
    network_id: str | None = None
    info: dict[str, Any] | None = None  # the numbers behind it, e.g. context_length


class Hello(Message):
    """Sent by the connecting side; the other answers HelloReply or error version_mismatch."""

    message_type: ClassVar[MessageType] = MessageType.hello

    node_id: Identifier
    network_id: Identifier
    software_version: str = SOFTWARE_VERSION
    protocol_version: str = PROTOCOL_VERSION
    role: str | None = None
    auth_nonce: HexBytes | None = None  # the challenge for the server (security.link_auth)


class HelloReply(Message):
    message_type: ClassVar[MessageType] = MessageType.hello_reply

    node_id: Identifier
    network_id: Identifier
    software_version: str = SOFTWARE_VERSION
    protocol_version: str = PROTOCOL_VERSION
    in_reply_to: MessageId
    auth_nonce: HexBytes | None = None  # the challenge for the client
    auth_proof: HexBytes | None = None  # the server's answer to the client's challenge


class NodeAuth(Message):
    """The connecting node's answer to the server's challenge (after hello_reply); the server
    answers ``ack``, or ``error`` auth_failed and closes the connection."""

    message_type: ClassVar[MessageType] = MessageType.node_auth

    proof: HexBytes


class _SessionControl(Message):
    network_id: Identifier | None = None  # a gateway's client may leave it out; nodes may not
    session_id: Identifier
    # between nodes: the replica chain the session runs on (its nodes' ids; None: the chain)
    route: list[Identifier] | None = Field(None, min_length=1, max_length=64)


class SessionOpen(_SessionControl):
    message_type: ClassVar[MessageType] = MessageType.session_open
    model_id: str | None = Field(None, max_length=200)


class SessionClose(_SessionControl):
    message_type: ClassVar[MessageType] = MessageType.session_close


class SessionSave(_SessionControl):
    message_type: ClassVar[MessageType] = MessageType.session_save


class SessionRestore(_SessionControl):
    message_type: ClassVar[MessageType] = MessageType.session_restore


class SessionTruncate(_SessionControl):
    """Rewind a session to its first ``length`` positions on every node (KV cache and the
    head's token history): an edited or regenerated turn recomputes only what changed."""

    message_type: ClassVar[MessageType] = MessageType.session_truncate
    length: int = Field(ge=0, le=limits.MAX_CONTEXT_TOKENS)


class Cancel(_SessionControl):
    message_type: ClassVar[MessageType] = MessageType.cancel


class Ack(Message):
    """Success answer to a control message; ``info`` carries details (e.g. cached tokens)."""

    message_type: ClassVar[MessageType] = MessageType.ack

    in_reply_to: MessageId
    network_id: str | None = None
    session_id: str | None = None
    detail: str | None = None
    info: dict[str, Any] = Field(default_factory=dict)


class LinkLost(Message):
    """A node tells the first node of its chain that its link to the next node dropped: steps
    in flight beyond it will get no answer (the head answers the first node directly)."""

    message_type: ClassVar[MessageType] = MessageType.link_lost

    network_id: Identifier
    node_id: Identifier
    peer: str = Field(max_length=300)  # the address that was lost


MESSAGE_MODELS: dict[MessageType, type[Message]] = {
    cls.message_type: cls
    for cls in (
        InferenceRequest,
        InferenceResponse,
        Heartbeat,
        Authentication,
        ErrorMessage,
        Hello,
        HelloReply,
        SessionOpen,
        SessionClose,
        SessionSave,
        SessionRestore,
        SessionTruncate,
        Cancel,
        Ack,
        LinkLost,
        NodeAuth,
    )
}


class LegacyTensors(BaseModel):
    """Seed-003 ``input_tensors``; other entries (e.g. hidden states) are kept as given."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    input_ids: list[TokenId] | str | None = None  # seed 003's own test sends text
    attention_mask: list[Literal[0, 1]] | None = None


class LegacyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    session_id: Identifier
    step: int = Field(ge=0)
    input_tensors: LegacyTensors
    network_id: Identifier | None = None  # legacy clients never send it


Kind = Literal["protocol", "seed000", "legacy"]


@dataclass(frozen=True)
class ParsedMessage:
    """What :func:`parse_message` found: the shape it came in and the validated model."""

    kind: Kind
    message: Message | LegacyRequest

    @property
    def message_type(self) -> MessageType:
        if isinstance(self.message, LegacyRequest):
            return MessageType.inference_request
        return self.message.header.message_type

    @property
    def message_id(self) -> str | None:
        return self.message.message_id if isinstance(self.message, Message) else None

    @property
    def network_id(self) -> str | None:
        return getattr(self.message, "network_id", None)

    @property
    def session_id(self) -> str | None:
        return getattr(self.message, "session_id", None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _load_json(raw: str | bytes | bytearray, max_bytes: int | None) -> Any:
    if max_bytes is not None and len(raw) > max_bytes:
        raise ProtocolError(FRAME_TOO_LARGE, f"message of {len(raw)} bytes exceeds {max_bytes}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(MALFORMED_JSON, f"not valid JSON: {exc}") from None


def _describe(exc: ValidationError) -> str:
    """Field paths and reasons only: the input values may hold credentials."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _optional_str(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value[:128]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def protocol_major(version: Any) -> int | None:
    """The major number of a ``"2.0"``-style version, or None when it is not one."""
    match = re.fullmatch(r"(\d+)(?:\.\d+)*", version) if isinstance(version, str) else None
    return int(match.group(1)) if match else None


def _validate(
    model: type[BaseModel], data: Any, message_id: str | None, session_id: str | None
) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(INVALID_MESSAGE, _describe(exc), message_id, session_id) from None


def _parse_protocol(data: dict[str, Any], session_id: str | None) -> ParsedMessage:
    header = data["header"]
    if not isinstance(header, dict):
        raise ProtocolError(INVALID_MESSAGE, "header must be an object", None, session_id)
    message_id = _optional_str(header.get("message_id"))
    version = header.get("protocol_version")
    if version is None:
        raise ProtocolError(
            INVALID_MESSAGE, "header.protocol_version is required", message_id, session_id
        )
    if protocol_major(version) != protocol_major(PROTOCOL_VERSION):
        raise ProtocolError(
            UNSUPPORTED_PROTOCOL_VERSION,
            f"protocol version {version!r:.40} is not supported; this node speaks "
            f"{PROTOCOL_VERSION}",
            message_id,
            session_id,
        )
    type_name = header.get("message_type")
    try:
        message_type = MessageType(type_name)
    except ValueError:
        raise ProtocolError(
            UNKNOWN_MESSAGE_TYPE, f"unknown message_type {type_name!r:.80}", message_id, session_id
        ) from None
    model = MESSAGE_MODELS[message_type]
    return ParsedMessage("protocol", _validate(model, data, message_id, session_id))


def _parse_seed000(data: dict[str, Any], session_id: str | None) -> ParsedMessage:
    message_id = _optional_str(data.get("message_id"))
    type_name = data.get("message_type", MessageType.inference_request.value)
    if type_name != MessageType.inference_request.value:
        raise ProtocolError(
            UNKNOWN_MESSAGE_TYPE,
            f"message_type {type_name!r:.80} is not accepted in the seed-000 shape "
            "(only inference_request); send a protocol 2.0 message with a header",
            message_id,
            session_id,
        )
    payload = data["payload"]
    if not isinstance(payload, dict):
        raise ProtocolError(INVALID_MESSAGE, "payload must be an object", message_id, session_id)
    body = dict(payload)
    if "max_length" in body:  # seed 000's name for the number of tokens to generate
        max_length = body.pop("max_length")
        body.setdefault("max_tokens", max_length)
    top = {k: v for k, v in data.items() if k not in ("payload", "message_type", "message_id")}
    header: dict[str, Any] = {"message_type": MessageType.inference_request}
    if message_id is not None:
        header["message_id"] = message_id
    if "timestamp" in top:
        header["timestamp"] = top.pop("timestamp")
    body.update(top)
    body["header"] = header
    return ParsedMessage("seed000", _validate(InferenceRequest, body, message_id, session_id))


def parse_message(
    raw: str | bytes | bytearray | Mapping[str, Any], *, max_bytes: int | None = None
) -> ParsedMessage:
    """Decode and validate one text message of any of the three shapes.

    Raises ProtocolError; its ``message_id`` (and ``session_id``) are filled whenever they
    could be read, even when the rest of the message is invalid.
    """
    data = dict(raw) if isinstance(raw, Mapping) else _load_json(raw, max_bytes)
    if not isinstance(data, dict):
        raise ProtocolError(INVALID_MESSAGE, f"expected a JSON object, got {type(data).__name__}")
    session_id = _optional_str(data.get("session_id"))
    if "header" in data:
        return _parse_protocol(data, session_id)
    if "network_id" in data and "payload" in data:
        return _parse_seed000(data, session_id)
    if "input_tensors" in data or ("session_id" in data and "step" in data):
        message_id = _optional_str(data.get("message_id"))
        return ParsedMessage("legacy", _validate(LegacyRequest, data, message_id, session_id))
    type_name = data.get("message_type")
    known = isinstance(type_name, str) and type_name in MessageType.__members__
    if "message_type" in data and not known:
        # a name we do not know, or no name at all ({"message_type": {}}): never a crash
        raise ProtocolError(
            UNKNOWN_MESSAGE_TYPE,
            f"unknown message_type {type_name!r:.80}",
            _optional_str(data.get("message_id")),
            session_id,
        )
    raise ProtocolError(
        INVALID_MESSAGE,
        "unrecognised message: expected a 'header' (protocol 2.0), 'network_id' + 'payload' "
        "(seed 000) or 'session_id' + 'step' + 'input_tensors' (legacy)",
        _optional_str(data.get("message_id")),
        session_id,
    )


def make_message(model: BaseModel) -> str:
    """The JSON text of a message, None fields left out."""
    return model.model_dump_json(exclude_none=True)


def error_reply(
    err: ProtocolError, *, network_id: str | None = None, license_hash: str | None = None
) -> dict[str, Any]:
    """The standard ``error`` message answering ``err`` (as a dict ready for json.dumps)."""
    message = ErrorMessage(
        header=Header(message_type=MessageType.error, license_hash=license_hash),
        code=err.code,
        message=err.message,
        in_reply_to=err.message_id,
        session_id=err.session_id,
        network_id=network_id,
        info=err.info,
    )
    return message.model_dump(mode="json", exclude_none=True)


def _software_major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_versions(
    local_software: str, local_protocol: str, remote_software: str, remote_protocol: str
) -> None:
    """Refuse a peer whose protocol major or software major.minor differs from ours."""
    local_p, remote_p = protocol_major(local_protocol), protocol_major(remote_protocol)
    local_s = _software_major_minor(local_software)
    remote_s = _software_major_minor(remote_software)
    if local_p is None or local_p != remote_p or local_s is None or local_s != remote_s:
        raise ProtocolError(
            VERSION_MISMATCH,
            f"version mismatch: this node runs TikTrue {local_software} (protocol "
            f"{local_protocol}), the other node runs TikTrue {remote_software} (protocol "
            f"{remote_protocol}); install the same TikTrue version on both",
        )


@dataclass
class ProtocolStats:
    """Counts of the messages a handler accepted, by shape (seed 003's statistics)."""

    total_requests: int = 0
    legacy_requests: int = 0
    protocol_requests: int = 0  # protocol 2.0 and seed-000 shapes
    errors: int = 0

    def record(self, parsed: ParsedMessage) -> None:
        self.total_requests += 1
        if parsed.kind == "legacy":
            self.legacy_requests += 1
        else:
            self.protocol_requests += 1

    def record_error(self) -> None:
        self.errors += 1

    @property
    def protocol_percentage(self) -> float:
        if not self.total_requests:
            return 0.0
        return 100.0 * self.protocol_requests / self.total_requests

    def as_dict(self) -> dict[str, float | int]:
        return {
            "total_requests": self.total_requests,
            "legacy_requests": self.legacy_requests,
            "protocol_requests": self.protocol_requests,
            "errors": self.errors,
            "protocol_percentage": self.protocol_percentage,
        }
