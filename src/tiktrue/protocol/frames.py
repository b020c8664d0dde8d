"""Binary tensor frames: the hot path between workers carries no JSON float arrays.

Layout of one frame (a WebSocket binary message)::

    N (4 bytes, big-endian unsigned) | N bytes UTF-8 JSON header | raw tensor bytes

The header holds at least ``dtype`` and ``shape`` plus whatever metadata the sender passes
(session_id, step, positions, network_id, message_id ...). The tensor bytes are C-contiguous and
little-endian; the header is padded with spaces so that they start 8-byte aligned in the frame.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

import torch

from tiktrue.limits import MAX_FRAME_HEADER_BYTES as MAX_HEADER_BYTES
from tiktrue.protocol.protocol_spec import BAD_TENSOR, FRAME_TOO_LARGE, ProtocolError

_PREFIX = struct.Struct(">I")
_ALIGN = 8
MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 31

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _require_little_endian() -> None:
    # Every platform TikTrue targets (x86-64, ARM64) is little-endian; refuse rather than
    # silently send or read swapped bytes.
    if sys.byteorder != "little":
        raise RuntimeError("tensor frames need a little-endian host")


def encode_tensor_frame(tensor: torch.Tensor, **meta: Any) -> bytes:
    """One frame holding ``tensor`` (copied to CPU) and the JSON-serialisable ``meta``."""
    _require_little_endian()
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(
            f"dtype {tensor.dtype} cannot travel in a frame; use one of {list(DTYPES)}"
        )
    if "dtype" in meta or "shape" in meta:
        raise ValueError("'dtype' and 'shape' are set by the frame itself")
    data = tensor.detach().to("cpu").contiguous()
    header = {"dtype": name, "shape": list(data.shape), **meta}
    raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
    return _pack(header, memoryview(raw))


def _pack(header: dict[str, Any], payload) -> bytes:
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    text += b" " * (-(_PREFIX.size + len(text)) % _ALIGN)
    if len(text) > MAX_HEADER_BYTES:
        raise ProtocolError(
            FRAME_TOO_LARGE, f"frame header of {len(text)} bytes exceeds {MAX_HEADER_BYTES}"
        )
    return b"".join((_PREFIX.pack(len(text)), text, payload))


def encode_bytes_frame(payload: bytes, **meta: Any) -> bytes:
    """A frame carrying raw bytes (block chunks) instead of a tensor; same layout."""
    if "length" in meta:
        raise ValueError("'length' is set by the frame itself")
    return _pack({"length": len(payload), **meta}, payload)


def decode_bytes_frame(
    data: bytes | bytearray | memoryview, *, max_bytes: int | None = None
) -> tuple[dict[str, Any], bytes]:
    view = memoryview(data).cast("B")
    if max_bytes is not None and len(view) > max_bytes:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {len(view)} bytes exceeds {max_bytes}")
    header, offset = _read_header(view)
    if header.get("length") != len(view) - offset:
        raise _bad(f"frame says {header.get('length')!r} bytes, holds {len(view) - offset}")
    return header, bytes(view[offset:])


def _bad(message: str) -> ProtocolError:
    return ProtocolError(BAD_TENSOR, message)


def _read_header(view: memoryview) -> tuple[dict[str, Any], int]:
    if len(view) < _PREFIX.size:
        raise _bad(f"truncated frame: {len(view)} bytes, no header length")
    (length,) = _PREFIX.unpack_from(view, 0)
    if length > MAX_HEADER_BYTES:
        raise _bad(f"frame header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + length
    if end > len(view):
        raise _bad(f"truncated frame: header says {length} bytes, {len(view) - 4} present")
    try:
        header = json.loads(bytes(view[_PREFIX.size : end]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad("frame header must be a JSON object")
    return header, end


def _read_shape(header: dict[str, Any]) -> list[int]:
    shape = header.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _bad(f"shape must be a list of at most {MAX_DIMS} sizes, got {shape!r:.80}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_DIM_SIZE:
            raise _bad(f"bad size {size!r:.40} in shape")
    return shape


def decode_tensor_frame(
    data: bytes | bytearray | memoryview, *, max_bytes: int | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """The header (dtype and shape included) and the tensor of one frame.

    A writable buffer (bytearray) is shared with the tensor, not copied; a read-only one
    (bytes, as websockets delivers) has its tensor bytes copied once so that the tensor is
    safely writable. Any defect raises ProtocolError ``frame_too_large`` or ``bad_tensor``.
    """
    _require_little_endian()
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:  # a non-contiguous view
        raise _bad(f"frame buffer is not contiguous: {exc}") from None
    header, offset = _read_header(view)  # first, so a refusal can name the message
    if max_bytes is not None and len(view) > max_bytes:
        message_id, session_id = header.get("message_id"), header.get("session_id")
        raise ProtocolError(
            FRAME_TOO_LARGE,
            f"frame of {len(view)} bytes exceeds {max_bytes}",
            message_id if isinstance(message_id, str) else None,
            session_id if isinstance(session_id, str) else None,
        )
    name = header.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise _bad(f"unknown dtype {name!r:.40}; expected one of {list(DTYPES)}")
    shape = _read_shape(header)
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(view) - offset != expected:
        raise _bad(
            f"shape {shape} of {name} needs {expected} bytes, the frame holds {len(view) - offset}"
        )
    if count == 0:
        return header, torch.empty(shape, dtype=dtype)
    if view.readonly:
        buffer: Any = bytearray(view[offset:])
        offset = 0
    else:
        buffer = view
    tensor = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    return header, tensor.reshape(shape)
