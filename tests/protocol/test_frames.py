from __future__ import annotations

import json
import struct
import uuid

import pytest
import torch

from tiktrue.protocol.frames import DTYPES, decode_tensor_frame, encode_tensor_frame
from tiktrue.protocol.protocol_spec import ProtocolError


def _sample(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(2, 3, 7, generator=gen).to(dtype)
    return torch.randint(-(2**30), 2**30, (2, 3, 7), generator=gen, dtype=dtype)


def _frame(header: dict[str, object], payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack(">I", len(text)) + text + payload


def _code(data: bytes, **kwargs: object) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_tensor_frame(data, **kwargs)  # type: ignore[arg-type]
    return info.value.code


@pytest.mark.parametrize("name", list(DTYPES))
def test_round_trip_bit_exact(name: str) -> None:
    tensor = _sample(DTYPES[name])
    frame = encode_tensor_frame(tensor, session_id="s1", step=3)
    for data in (frame, bytearray(frame), memoryview(frame)):
        header, out = decode_tensor_frame(data)
        assert header["dtype"] == name and header["shape"] == [2, 3, 7]
        assert out.dtype == tensor.dtype and out.shape == tensor.shape
        assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8))  # bit-exact


def test_bfloat16_special_values() -> None:
    tensor = torch.tensor([0.0, -0.0, 1e-40, 3.0e38, float("inf"), float("-inf")]).bfloat16()
    _, out = decode_tensor_frame(encode_tensor_frame(tensor))
    assert torch.equal(out.view(torch.int16), tensor.view(torch.int16))


def test_metadata_kept() -> None:
    meta = {
        "session_id": "s1",
        "step": 4,
        "positions": [10, 11, 12],
        "network_id": "net1",
        "message_id": "m-1",
    }
    header, _ = decode_tensor_frame(encode_tensor_frame(torch.zeros(1, 3, 4), **meta))
    assert {k: header[k] for k in meta} == meta


def test_non_contiguous_scalar_and_empty() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    _, out = decode_tensor_frame(encode_tensor_frame(tensor))
    assert torch.equal(out, tensor)
    _, out = decode_tensor_frame(encode_tensor_frame(torch.tensor(2.5)))
    assert out.shape == () and out.item() == 2.5
    _, out = decode_tensor_frame(encode_tensor_frame(torch.zeros(0, 4, dtype=torch.int64)))
    assert out.shape == (0, 4) and out.dtype == torch.int64


def test_decoded_tensor_is_writable_and_bytearray_is_shared() -> None:
    frame = encode_tensor_frame(torch.zeros(4))
    _, out = decode_tensor_frame(frame)
    out += 1  # bytes input: a private copy, so writing is safe
    assert decode_tensor_frame(frame)[1].sum().item() == 0
    buf = bytearray(frame)
    _, shared = decode_tensor_frame(buf)
    shared[0] = 1.0
    assert buf[-16:-12] == struct.pack("<f", 1.0)  # zero-copy view of the bytearray


def test_small_header_for_hidden_state() -> None:
    tensor = torch.randn(1, 1, 576)
    meta = dict(
        session_id="session_abc123",
        step=17,
        positions=[41],
        network_id="network_001",
        message_id=str(uuid.uuid4()),
    )
    frame = encode_tensor_frame(tensor, **meta)
    (header_len,) = struct.unpack(">I", frame[:4])
    assert header_len < 300
    assert len(frame) == 4 + header_len + 576 * 4
    assert (4 + header_len) % 8 == 0  # tensor bytes start aligned


def test_truncated_frames() -> None:
    frame = encode_tensor_frame(torch.ones(2, 2))
    assert _code(b"") == "bad_tensor"
    assert _code(frame[:3]) == "bad_tensor"
    assert _code(frame[:10]) == "bad_tensor"  # header cut
    assert _code(frame[:-1]) == "bad_tensor"  # tensor bytes cut
    assert _code(frame + b"\0") == "bad_tensor"  # trailing bytes


def test_bad_headers() -> None:
    assert _code(struct.pack(">I", 3) + b"{x}") == "bad_tensor"
    assert _code(struct.pack(">I", 2) + b"\xff\xfe") == "bad_tensor"
    assert _code(_frame([1, 2], b"")) == "bad_tensor"  # type: ignore[arg-type]
    assert _code(struct.pack(">I", 2**32 - 1) + b"{}") == "bad_tensor"  # header too long


def test_unknown_dtype() -> None:
    assert _code(_frame({"dtype": "complex64", "shape": [1]}, b"\0" * 8)) == "bad_tensor"
    assert _code(_frame({"dtype": None, "shape": [1]}, b"\0" * 4)) == "bad_tensor"
    assert _code(_frame({"shape": [1]}, b"\0" * 4)) == "bad_tensor"


@pytest.mark.parametrize(
    "shape",
    [[2, 3], [-1, 4], [1.5], ["2"], [True], None, "2x2", [2**40, 2**40], [1] * 9],
)
def test_lying_or_absurd_shape(shape: object) -> None:
    assert _code(_frame({"dtype": "float32", "shape": shape}, b"\0" * 16)) == "bad_tensor"


def test_over_max_bytes() -> None:
    frame = encode_tensor_frame(torch.zeros(64))
    assert decode_tensor_frame(frame, max_bytes=len(frame))[1].shape == (64,)
    assert _code(frame, max_bytes=len(frame) - 1) == "frame_too_large"


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_tensor_frame(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError):
        encode_tensor_frame(torch.zeros(2), shape=[3])
