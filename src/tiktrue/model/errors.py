"""Typed errors of the model layer; ``code`` is what the wire protocol reports."""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error the model layer raises on purpose."""

    code = "model_error"


class UnsupportedArchitecture(ModelError):
    code = "unsupported_architecture"


class StoreError(ModelError):
    """A block store is missing, malformed, or does not match its manifest."""

    code = "store_error"


class CorruptBlock(StoreError):
    """A block file is missing, unreadable, or its bytes do not match the manifest's sha256.

    ``reason``: missing, unreadable, unsealable (a sealed chunk does not open), wrong_size,
    sha256_mismatch, unparsable; ``detail`` says it for people."""

    code = "corrupt_block"

    def __init__(self, blocks: list[str], detail: str = "", *, reason: str = "corrupt") -> None:
        self.blocks = blocks
        self.detail = detail or reason
        self.reason = reason
        names = ", ".join(blocks)
        super().__init__(f"corrupted block(s): {names}" + (f" ({detail})" if detail else ""))


class EngineError(ModelError):
    """A request the block engine cannot serve."""

    code = "engine_error"


class UnknownSession(EngineError):
    code = "unknown_session"


class SessionExists(EngineError):
    code = "session_exists"


class PositionError(EngineError):
    """Positions not contiguous with what the session's KV cache already holds."""

    code = "bad_positions"


class ShapeError(EngineError):
    """Inputs of the wrong kind or shape for this span (e.g. wrong hidden size)."""

    code = "bad_shape"


class CacheBudgetExceeded(EngineError):
    """The KV page pool cannot hold the request even after spilling other sessions."""

    code = "kv_budget_exceeded"
