"""``SessionPagedKVCache``: the KV cache of one worker's layers, for many sessions at once.

A fixed pool of pages lives inside the worker's memory budget; each session owns a page table
(a list of page numbers). When the pool is full, the least recently used other session is
spilled to disk and brought back when it is used again (a two-level cache: RAM pages, disk).

Pool layout: ``[layer, k|v, kv_head, page, token_in_page, head_dim]``. A forward step is a list
of rows (a session's position each: a prefill chunk is many rows of one session, a decode batch
one row of each of several); ``plan`` lays them out for the attention kernel
(``model.attention``), which reads each row's keys from its session's pages where they lie.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tiktrue.limits import KV_PAGE_TOKENS, kv_bytes_per_token_per_layer
from tiktrue.model.errors import (
    CacheBudgetExceeded,
    PositionError,
    SessionExists,
    ShapeError,
    UnknownSession,
)

SAVE_FORMAT = "tiktrue-kv/1"


@dataclass
class _Session:
    length: int = 0
    pages: list[int] = field(default_factory=list)
    page_index: torch.Tensor | None = None  # ``pages`` as a tensor, rebuilt when pages change


@dataclass
class CacheStats:
    page_size: int
    pages_total: int
    pages_free: int
    sessions_resident: int
    sessions_spilled: int
    bytes_per_page: int

    @property
    def bytes_used(self) -> int:
        return (self.pages_total - self.pages_free) * self.bytes_per_page


class SessionPagedKVCache:
    """Paged KV storage for ``layer_ids`` (global layer numbers) of one span."""

    def __init__(
        self,
        layer_ids: list[int],
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        budget_bytes: int = 256 << 20,
        page_size: int = KV_PAGE_TOKENS,
        spill_dir: Path | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layer_ids = list(layer_ids)
        self._local = {layer: i for i, layer in enumerate(self.layer_ids)}
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.page_size = page_size
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = kv_bytes_per_token_per_layer(num_kv_heads, head_dim, itemsize)
        self.bytes_per_page = len(self.layer_ids) * page_size * per_token
        self.num_pages = budget_bytes // self.bytes_per_page if self.bytes_per_page else 0
        if self.layer_ids and self.num_pages < 1:
            raise CacheBudgetExceeded(
                f"a KV budget of {budget_bytes} bytes holds no page "
                f"(one page of {page_size} tokens needs {self.bytes_per_page} bytes)"
            )
        # torch.empty: the OS commits memory only for pages that are written (each page is
        # zeroed when a session takes it, see ``_reserve``).
        self.pool = torch.empty(
            (len(self.layer_ids), 2, num_kv_heads, self.num_pages, page_size, head_dim),
            dtype=dtype,
            device=device,
        )
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._resident: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._spilled: dict[str, tuple[Path, int]] = {}
        self._own_spill_dir = spill_dir is None
        self.spill_dir = (
            Path(spill_dir) if spill_dir else Path(tempfile.mkdtemp(prefix="tiktrue-kv-"))
        )
        self.spill_dir.mkdir(parents=True, exist_ok=True)

    # --- sessions ------------------------------------------------------------------------

    def open(self, session_id: str) -> None:
        if self.has(session_id):
            raise SessionExists(f"session {session_id!r} is already open")
        self._resident[session_id] = _Session()

    def has(self, session_id: str) -> bool:
        return session_id in self._resident or session_id in self._spilled

    def sessions(self) -> list[str]:
        return [*self._resident, *self._spilled]

    def length(self, session_id: str) -> int:
        if session_id in self._spilled:
            return self._spilled[session_id][1]
        return self._session(session_id).length

    def close(self, session_id: str) -> None:
        if session_id in self._spilled:
            path, _ = self._spilled.pop(session_id)
            path.unlink(missing_ok=True)
            return
        session = self._session(session_id)
        self._free.extend(reversed(session.pages))
        del self._resident[session_id]

    def truncate(self, session_id: str, length: int) -> None:
        """Forget positions ``>= length`` (regenerate an answer, drop a rejected draft)."""
        session = self._resident_session(session_id)
        if not 0 <= length <= session.length:
            raise PositionError(
                f"session {session_id!r} holds {session.length} positions; "
                f"cannot truncate to {length}"
            )
        keep = -(-length // self.page_size)
        self._free.extend(reversed(session.pages[keep:]))
        del session.pages[keep:]
        session.page_index = None
        session.length = length

    def stats(self) -> CacheStats:
        return CacheStats(
            page_size=self.page_size,
            pages_total=self.num_pages,
            pages_free=len(self._free),
            sessions_resident=len(self._resident),
            sessions_spilled=len(self._spilled),
            bytes_per_page=self.bytes_per_page,
        )

    # --- the forward pass ----------------------------------------------------------------

    def begin(
        self, session_id: str, start: int, count: int, *, pinned: frozenset[str] = frozenset()
    ) -> SessionStep:
        """Reserve room for ``count`` new positions at ``start`` (then ``plan`` the step).

        Sessions in ``pinned`` (the others of a batch being prepared) are never spilled to
        make room."""
        session = self._resident_session(session_id, pinned)
        if start != session.length:
            raise PositionError(
                f"session {session_id!r} holds positions 0..{session.length - 1}; "
                f"the next request must start at {session.length}, not {start}"
            )
        if count < 1:
            raise ShapeError("a step needs at least one position")
        self._reserve(session_id, session, start + count, pinned)
        return SessionStep(session, start, count)

    def plan(self, steps: list[SessionStep]) -> RowPlan:
        """The rows of ``steps`` (each step's positions in order, steps in order) as the
        layers write them and the attention kernel reads them. Steps of one forward belong to
        different sessions."""
        size = self.page_size
        pages, slots, lengths, row_table = [], [], [], []
        for n, step in enumerate(steps):
            table = step.session.pages
            for at in range(step.start, step.start + step.count):
                page, slot = divmod(at, size)
                pages.append(table[page])
                slots.append(slot)
                lengths.append(at + 1)
                row_table.append(n)
        tables = np.zeros((len(steps), max(len(s.session.pages) for s in steps)), dtype=np.int64)
        for n, step in enumerate(steps):
            tables[n, : len(step.session.pages)] = step.session.pages
        device = self.pool.device
        return RowPlan(
            steps=tuple(steps),
            write_pages=torch.tensor(pages, dtype=torch.long, device=device),
            write_slots=torch.tensor(slots, dtype=torch.long, device=device),
            lengths=np.array(lengths, dtype=np.int64),
            row_table=np.array(row_table, dtype=np.int64),
            tables=tables,
        )

    def write(self, local: int, plan: RowPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the rows' keys and values (``[rows, kv_heads, head_dim]``) of layer
        ``local`` (the cache's own index of a layer: ``layer_ids.index(layer)``)."""
        pages, slots = plan.write_pages, plan.write_slots
        self.pool[local, 0][:, pages, slots] = keys.transpose(0, 1).to(self.dtype)
        self.pool[local, 1][:, pages, slots] = values.transpose(0, 1).to(self.dtype)

    def keys_values(self, session_id: str, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A session's keys and values of one layer, ``[1, heads, length, head_dim]`` each."""
        session = self._resident_session(session_id)
        return self._gather(session, self._local[layer_id], session.length)

    def commit(self, plan: RowPlan) -> None:
        """The planned steps are computed: their sessions hold their new positions."""
        for step in plan.steps:
            step.session.length = step.start + step.count

    def _reserve(
        self, session_id: str, session: _Session, length: int, pinned: frozenset[str]
    ) -> None:
        needed = -(-length // self.page_size) - len(session.pages)
        if needed <= 0 or not self.layer_ids:
            return
        if needed > self.num_pages - len(session.pages):
            raise CacheBudgetExceeded(
                f"session {session_id!r} needs {length} positions "
                f"({-(-length // self.page_size)} pages) but the KV budget holds "
                f"{self.num_pages} pages"
            )
        while len(self._free) < needed:
            victim = next(
                (
                    s
                    for s in self._resident
                    if s != session_id and s not in pinned and self._resident[s].pages
                ),
                None,
            )
            if victim is None:  # only sessions of the same batch hold pages
                raise CacheBudgetExceeded(
                    f"session {session_id!r} needs {needed} more pages while the other "
                    f"sessions of its batch hold the rest"
                )
            self._spill(victim)
        fresh = [self._free.pop() for _ in range(needed)]
        # A page holds what its last owner (or the allocator) left: a batched step reads a
        # row's last page past its length and pads shorter rows, under the attention mask, and
        # a masked weight (0) times a NaN left there is NaN. Zeroed here, whatever is read
        # under a mask is finite by construction (one page per page_size tokens: cheap).
        for page in fresh:
            self.pool.select(3, page).zero_()
        session.pages.extend(fresh)
        session.page_index = None

    def _index(self, session: _Session) -> torch.Tensor:
        if session.page_index is None:
            session.page_index = torch.tensor(
                session.pages, dtype=torch.long, device=self.pool.device
            )
        return session.page_index

    def _gather(
        self, session: _Session, local: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index(session)
        shape = (1, self.num_kv_heads, len(session.pages) * self.page_size, self.head_dim)
        keys = self.pool[local, 0].index_select(1, index).view(shape)[:, :, :length]
        values = self.pool[local, 1].index_select(1, index).view(shape)[:, :, :length]
        return keys, values

    # --- spill, save and load ------------------------------------------------------------

    def _resident_session(self, session_id: str, pinned: frozenset[str] = frozenset()) -> _Session:
        if session_id in self._spilled:
            self._reload(session_id, pinned)
        session = self._session(session_id)
        self._resident.move_to_end(session_id)
        return session

    def _session(self, session_id: str) -> _Session:
        try:
            return self._resident[session_id]
        except KeyError:
            raise UnknownSession(f"unknown session {session_id!r}") from None

    def _spill(self, session_id: str) -> None:
        path = self.spill_dir / f"{_safe_name(session_id)}.npz"
        length = self._resident[session_id].length
        self.save_to_disk(session_id, path, compress=False)
        self.close(session_id)
        self._spilled[session_id] = (path, length)

    def _reload(self, session_id: str, pinned: frozenset[str]) -> None:
        path, _ = self._spilled.pop(session_id)
        try:
            self.load_from_disk(session_id, path, pinned=pinned)
        except Exception:
            self._spilled[session_id] = (path, _)
            raise
        path.unlink(missing_ok=True)

    def save_to_disk(self, session_id: str, path: Path, *, compress: bool = True) -> Path:
        """Write the session's keys and values (``numpy.savez_compressed``); returns the path."""
        session = self._resident_session(session_id)
        keys, values = [], []
        for local in range(len(self.layer_ids)):
            k, v = self._gather(session, local, session.length)
            keys.append(k[0])
            values.append(v[0])
        arrays = {
            "format": np.array(SAVE_FORMAT),
            "length": np.array(session.length),
            "layer_ids": np.array(self.layer_ids, dtype=np.int64),
            "dtype": np.array(str(self.dtype).removeprefix("torch.")),
            "keys": _to_numpy(torch.stack(keys)) if keys else np.zeros(0),
            "values": _to_numpy(torch.stack(values)) if values else np.zeros(0),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # a file handle: numpy must not append ".npz"
            (np.savez_compressed if compress else np.savez)(handle, **arrays)
        return path

    def load_from_disk(
        self, session_id: str, path: Path, *, pinned: frozenset[str] = frozenset()
    ) -> None:
        """Open ``session_id`` with the keys and values saved at ``path`` (spilling any
        resident session but those ``pinned`` to make room)."""
        if self.has(session_id):
            raise SessionExists(f"session {session_id!r} is already open")
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                fields = {name: data[name] for name in data.files}
        except (OSError, ValueError, KeyError) as exc:
            raise ShapeError(f"{path} is not a saved KV cache: {exc}") from exc
        if str(fields.get("format")) != SAVE_FORMAT:
            raise ShapeError(f"{path} is not a saved KV cache of format {SAVE_FORMAT}")
        if [int(x) for x in fields["layer_ids"]] != self.layer_ids:
            raise ShapeError(
                f"{path} holds layers {list(fields['layer_ids'])}, "
                f"this cache holds {self.layer_ids}"
            )
        if str(fields["dtype"]) != str(self.dtype).removeprefix("torch."):
            raise ShapeError(
                f"{path} holds {fields['dtype']} values, this cache holds {self.dtype}"
            )
        length = int(fields["length"])
        self.open(session_id)
        if not self.layer_ids or length == 0:
            self._resident[session_id].length = length
            return
        keys = _from_numpy(fields["keys"], self.dtype)
        values = _from_numpy(fields["values"], self.dtype)
        expected = (len(self.layer_ids), self.num_kv_heads, length, self.head_dim)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected:
            del self._resident[session_id]
            raise ShapeError(f"{path} holds keys of shape {tuple(keys.shape)}, expected {expected}")
        try:
            plan = self.plan([self.begin(session_id, 0, length, pinned=pinned)])
        except Exception:
            self.close(session_id)
            raise
        for local in range(len(self.layer_ids)):
            self.write(local, plan, keys[local].transpose(0, 1), values[local].transpose(0, 1))
        self.commit(plan)

    def clear(self) -> None:
        for session_id in list(self.sessions()):
            self.close(session_id)
        if self._own_spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


@dataclass(frozen=True)
class SessionStep:
    """Positions ``start..start+count-1`` of a session, their pages reserved (``begin``)."""

    session: _Session
    start: int
    count: int


@dataclass(frozen=True)
class RowPlan:
    """One forward step's rows: where each row's key and value go (``write_pages``,
    ``write_slots``), and what the attention kernel reads (``tables``: each step's page table;
    ``row_table``: each row's step; ``lengths``: each row's position + 1)."""

    steps: tuple[SessionStep, ...]
    write_pages: torch.Tensor
    write_slots: torch.Tensor
    lengths: np.ndarray
    row_table: np.ndarray
    tables: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.lengths)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the raw 16-bit words
        return tensor.cpu().view(torch.int16).numpy()
    return tensor.cpu().numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor.to(dtype)


def _safe_name(session_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in session_id)[:80] + (
        f"-{abs(hash(session_id)) % 10**8}"
    )
