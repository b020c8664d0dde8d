"""A session as a node holds it, and the control messages that change it.

On a node a session is one thing: its keys and values in the span's KV cache (``length``
positions) and, where the span ends with the head, the sampler that has seen the same tokens.
``SpanSessions`` changes both together, always on the span worker's thread: open (afresh),
close, truncate, save and restore. A control message travels the chain (``travel``): applied
here, then passed to the next node; the ack carries what each node holds of the session.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tiktrue.model.engine import BlockEngine
from tiktrue.model.sampling import SessionSampler
from tiktrue.node.peer_link import PeerLink
from tiktrue.protocol import protocol_spec as ps

log = logging.getLogger("tiktrue.node")
CONTROL = (
    ps.SessionOpen,
    ps.SessionClose,
    ps.SessionSave,
    ps.SessionRestore,
    ps.SessionTruncate,
)


class SpanSessions:
    """The sessions of one span: its engine's KV cache and (head) their samplers."""

    def __init__(self, engine: BlockEngine, folder: Path) -> None:
        self.engine = engine
        self.folder = Path(folder)  # <data>/sessions/<network>: saved sessions
        self.samplers: dict[str, SessionSampler] = {}

    def sampler(self, session_id: str) -> SessionSampler:
        return self.samplers.setdefault(session_id, SessionSampler())

    def open(self, session_id: str) -> None:
        """Start a session afresh: a gateway replaying it onto a changed chain may find what
        an unchanged node still holds of it."""
        self.close(session_id)
        self.engine.open_session(session_id)

    def close(self, session_id: str) -> None:
        """Idempotent: closing a session this node does not hold is no error."""
        if self.engine.kv.has(session_id):
            self.engine.close_session(session_id)
        self.samplers.pop(session_id, None)

    def close_all(self) -> int:
        """Free every session (the node left the chain: nobody will step or close them)."""
        held = self.engine.kv.sessions()
        for session_id in held:
            self.close(session_id)
        self.samplers.clear()
        return len(held)

    def truncate(self, session_id: str, length: int) -> None:
        self.engine.truncate_session(session_id, length)  # PositionError past its end
        sampler = self.samplers.get(session_id)
        if sampler is not None:  # the head's history is what the caches hold
            del sampler.history[length:]

    def save(self, session_id: str) -> None:
        folder = self.folder / session_id
        self.engine.save_session(session_id, self._span_file(folder))
        if self.engine.span.has_head:
            history = self.samplers.get(session_id, SessionSampler()).history
            (folder / "history.json").write_text(json.dumps(history), "utf-8")

    def restore(self, session_id: str, message_id: str | None = None) -> None:
        folder = self.folder / session_id
        span_file = self._span_file(folder)
        if not span_file.is_file():
            raise ps.ProtocolError(
                ps.SESSION_NOT_FOUND,
                f"no saved session {session_id} for {self.engine.span} on this node",
                message_id,
                session_id,
            )
        self.close(session_id)  # a restore replaces what the node holds of it
        self.engine.load_session(session_id, span_file)
        if self.engine.span.has_head:
            history = json.loads((folder / "history.json").read_text("utf-8"))
            self.samplers[session_id] = SessionSampler(history=history)

    def apply(self, message: ps.Message) -> dict[str, Any]:
        """One control message, here; what this node then holds of the session."""
        sid = message.session_id
        if isinstance(message, ps.SessionOpen):
            self.open(sid)
        elif isinstance(message, ps.SessionClose):
            self.close(sid)
        elif isinstance(message, ps.SessionSave):
            self.save(sid)
        elif isinstance(message, ps.SessionTruncate):
            self.truncate(sid, message.length)
        elif isinstance(message, ps.SessionRestore):
            self.restore(sid, message.message_id)
        if not self.engine.kv.has(sid):
            return {}
        return {f"length@{self.engine.span}": self.engine.session_length(sid)}

    def _span_file(self, folder: Path) -> Path:
        blocks = self.engine.span.blocks
        return folder / f"{blocks[0]}-{blocks[-1]}.npz"


async def travel(
    message: ps.Message,
    apply_here: Callable[[ps.Message], Awaitable[dict[str, Any]]],
    after: PeerLink | None,
    *,
    network_id: str,
    timeout: float,
) -> dict:
    """Apply a control message on this node, then on every later node of the chain; the ack
    merges what each holds, or the first error on the way (within ``timeout`` per node)."""
    info = await apply_here(message)
    if after is not None:
        reply = await after.request(message, message.message_id, timeout=timeout)
        if reply.get("header", {}).get("message_type") == "error":
            return reply
        info = {**reply.get("info", {}), **info}
    return ps.Ack(
        in_reply_to=message.message_id,
        network_id=network_id,
        session_id=message.session_id,
        info=info,
    ).model_dump(mode="json", exclude_none=True)
