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
    """A block file's bytes do not match the sha256 in the manifest."""

    code = "corrupt_block"

    def __init__(self, blocks: list[str], detail: str = "") -> None:
        self.blocks = blocks
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
