"""Download a model's block store (or a worker's span of it) from a model repository.

The repository is any static HTTP server holding ``<source>/<model_id>/manifest.json`` and the
files it names (see :mod:`tiktrue.control.model_repository`). The download

- writes each file to ``<name>.partial`` and renames it into place only once its sha256 matches
  the manifest, so a final name never holds unverified bytes;
- reads blocks in ``chunk_size`` pieces and checks each piece against the manifest's chunk hash
  as it arrives; a bad chunk is dropped and fetched again alone with a ``Range`` request;
- resumes an interrupted file with ``Range: bytes=N-`` after re-verifying the bytes already in
  the ``.partial`` file chunk by chunk (a bad chunk cuts the file back to the last good one);
- skips a file already present and valid (size and sha256);
- writes ``manifest.json`` last: a store without a manifest is an incomplete download.

A server that ignores ``Range`` (answers 200) still works: the bytes before the resume point are
read and dropped. Memory stays at about one chunk per download.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from tiktrue.model.errors import StoreError
from tiktrue.model.store import MANIFEST, STORE_FORMAT, BlockStore, Manifest, sha256_file

PARTIAL_SUFFIX = ".partial"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_MODEL_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


class DownloadError(StoreError):
    """A model could not be downloaded (what failed and where is in the message)."""

    code = "download_failed"


@dataclass
class DownloadProgress:
    """One step of a download; ``done_bytes``/``total_bytes`` cover the whole download
    (files already held count as done), ``file_*`` the current file."""

    model_id: str
    file: str  # block name, or the file's path for non-block files (config.json, ...)
    done_bytes: int
    total_bytes: int
    file_done_bytes: int
    file_total_bytes: int
    skipped: bool = False  # already held and valid: not downloaded
    finished: bool = False  # this file is complete and verified


@dataclass
class _Item:
    name: str  # what progress reports: block name or file path
    relative: str  # path inside the store
    size: int
    sha256: str
    chunk_size: int = 0  # 0: no chunk hashes, verified as a whole
    chunks: tuple[str, ...] = ()
    is_block: bool = False

    def label(self) -> str:
        return f"block {self.name!r}" if self.is_block else f"file {self.name!r}"


def download_model_blocks(
    model_id: str,
    source: str,
    *,
    dest_root: Path,
    blocks: list[str] | None = None,
    progress_callback: Callable[[DownloadProgress], None] | None = None,
    client: httpx.Client | None = None,
    retries: int = 3,
) -> BlockStore:
    """Download ``model_id`` from the repository at ``source`` into ``dest_root/model_id``.

    ``blocks`` limits the download to those blocks (a worker's span); the store's other files
    (config, tokenizer) and the manifest are always fetched. Returns the opened store. Raises
    :class:`DownloadError`; whatever was fetched stays in ``.partial`` files that the next call
    resumes.
    """
    if not _MODEL_ID.match(model_id):
        raise DownloadError(f"model id {model_id!r} may only use letters, digits, '-', '_' and '.'")
    base = source.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    owned = client is None
    http = client or httpx.Client(timeout=DEFAULT_TIMEOUT)
    try:
        job = _Download(model_id, base, Path(dest_root), http, progress_callback, retries)
        return job.run(blocks)
    finally:
        if owned:
            http.close()


class _Download:
    def __init__(self, model_id, base, dest_root, client, callback, retries) -> None:
        self.model_id = model_id
        self.base = base
        self.dest = dest_root / model_id
        self.client = client
        self.callback = callback
        self.retries = max(0, int(retries))
        self.total = 0
        self.done = 0

    # --- plan -------------------------------------------------------------------------------

    def run(self, blocks: list[str] | None) -> BlockStore:
        raw, manifest = self._fetch_manifest()
        items = self._plan(manifest, blocks)
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(f"cannot create {self.dest}: {_os_reason(exc)}") from exc
        manifest_path = self.dest / MANIFEST
        if manifest_path.is_file() and manifest_path.read_bytes() != raw:
            manifest_path.unlink()  # another version: the store is incomplete until we finish
        held = {item.relative for item in items if self._is_held(item)}
        self.total = sum(item.size for item in items)
        self._check_free_space([item for item in items if item.relative not in held])
        for item in items:
            if item.relative in held:
                self.done += item.size
                self._report(item, item.size, skipped=True, finished=True)
            elif item.chunks:
                self._fetch_chunked(item)
            else:
                self._fetch_whole(item)
        self._write_atomically(manifest_path, raw)
        try:
            return BlockStore(self.dest)
        except StoreError as exc:
            raise DownloadError(f"downloaded store does not open: {exc}") from exc

    def _fetch_manifest(self) -> tuple[bytes, Manifest]:
        url = self._url(MANIFEST)
        try:
            response = self.client.get(url)
        except httpx.TransportError as exc:
            raise DownloadError(
                f"cannot reach the model repository at {self.base}: {_transport_reason(exc)}"
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a malformed source URL
            raise DownloadError(f"bad model repository address {self.base!r}: {exc}") from exc
        if response.status_code == 404:
            raise DownloadError(f"model {self.model_id!r} not found at {self.base}")
        if response.status_code != 200:
            raise DownloadError(
                f"the model repository at {self.base} answered {response.status_code} for {url}"
            )
        raw = response.content
        try:
            manifest = Manifest.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            raise DownloadError(f"invalid manifest for {self.model_id!r} at {url}: {exc}") from exc
        if manifest.format != STORE_FORMAT:
            raise DownloadError(f"{url}: unsupported store format {manifest.format!r}")
        if manifest.model_id != self.model_id:
            raise DownloadError(
                f"invalid manifest at {url}: it describes model {manifest.model_id!r}"
            )
        return raw, manifest

    def _plan(self, manifest: Manifest, blocks: list[str] | None) -> list[_Item]:
        wanted = list(manifest.model_chain_order if blocks is None else blocks)
        unknown = [name for name in wanted if name not in manifest.blocks]
        if unknown:
            raise DownloadError(f"model {self.model_id!r} has no block(s): {', '.join(unknown)}")
        items = [
            _Item(name=path, relative=_safe_relative(path), size=f.bytes, sha256=f.sha256)
            for path, f in manifest.files.items()
            if path != MANIFEST
        ]
        for name in dict.fromkeys(wanted):
            entry = manifest.blocks[name]
            item = _Item(
                name=name,
                relative=_safe_relative(entry.file),
                size=entry.bytes,
                sha256=entry.sha256,
                is_block=True,
            )
            if entry.chunks:
                if entry.chunk_size <= 0 or len(entry.chunks) != entry.chunk_count():
                    raise DownloadError(
                        f"invalid manifest for {self.model_id!r}: block {name!r} lists "
                        f"{len(entry.chunks)} chunk hashes for {entry.chunk_count()} chunks"
                    )
                item.chunk_size, item.chunks = entry.chunk_size, tuple(entry.chunks)
            items.append(item)
        return items

    def _is_held(self, item: _Item) -> bool:
        """True if the final file is valid; an invalid one is moved aside (or removed)."""
        final = self.dest / item.relative
        partial = _partial(final)
        if not final.is_file():
            return False
        if final.stat().st_size == item.size and sha256_file(final) == item.sha256:
            partial.unlink(missing_ok=True)
            return True
        # never keep what does not verify; a chunked block's good chunks are reused on resume
        if item.chunks and not partial.exists():
            os.replace(final, partial)
        else:
            final.unlink()
        return False

    def _check_free_space(self, items: list[_Item]) -> None:
        needed = 0
        for item in items:
            partial = _partial(self.dest / item.relative)
            have = partial.stat().st_size if partial.is_file() and item.chunks else 0
            needed += max(0, item.size - have)
        free = _free_bytes(self.dest)
        if needed > free:
            raise DownloadError(
                f"not enough disk space in {self.dest}: the download needs "
                f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free"
            )

    # --- chunked blocks ---------------------------------------------------------------------

    def _fetch_chunked(self, item: _Item) -> None:
        final = self.dest / item.relative
        partial = _partial(final)
        url = self._url(item.relative)
        whole = hashlib.sha256()
        failures: dict[int, int] = {}  # chunk index -> corrupt copies received
        transport_failures = 0
        with self._open_partial(partial, item) as handle:
            offset = self._verify_prefix(handle, partial, item, whole)
            start = self.done
            self.done += offset
            self._report(item, offset)
            while offset < item.size:
                index = offset // item.chunk_size
                # after a corrupt copy, ask for exactly that chunk; otherwise for the rest
                end = _chunk_end(item, index) if failures.get(index) else None
                before = offset
                try:
                    offset = self._stream_chunks(item, url, handle, partial, whole, offset, end)
                except _CorruptChunk as bad:
                    failures[bad.index] = failures.get(bad.index, 0) + 1
                    if failures[bad.index] > self.retries:
                        raise DownloadError(
                            f"block {item.name!r} of {self.model_id!r}: chunk {bad.index} "
                            f"(bytes {bad.start}-{bad.end - 1}) still fails its sha256 after "
                            f"{self.retries} re-downloads from {self.base}"
                        ) from None
                    offset = bad.start
                except httpx.TransportError as exc:
                    offset = handle.tell()
                    transport_failures = 0 if offset > before else transport_failures + 1
                    if transport_failures > self.retries:
                        raise DownloadError(
                            f"lost the connection to {self.base} while downloading "
                            f"{item.label()} of {self.model_id!r} at byte {offset}: "
                            f"{_transport_reason(exc)}"
                        ) from exc
                    time.sleep(0.2 * transport_failures)
                self.done = start + offset
            self._flush(handle, partial)
        if whole.hexdigest() != item.sha256:
            partial.unlink(missing_ok=True)  # every chunk matched: the manifest contradicts itself
            raise DownloadError(
                f"{item.label()} of {self.model_id!r}: every chunk verified but the whole file's "
                "sha256 does not match the manifest (inconsistent manifest)"
            )
        self._replace(partial, final)
        self._report(item, item.size, finished=True)

    def _verify_prefix(self, handle: BinaryIO, partial: Path, item: _Item, whole) -> int:
        """Keep the longest run of good chunks already in ``partial``; return its length."""
        good = 0
        handle.seek(0)
        for index, expected in enumerate(item.chunks):
            want = _chunk_end(item, index) - good
            data = handle.read(want)
            if len(data) != want or hashlib.sha256(data).hexdigest() != expected:
                break
            whole.update(data)
            good += want
        try:
            handle.truncate(good)
            handle.seek(good)
        except OSError as exc:
            raise self._disk_error(exc, partial) from exc
        return good

    def _stream_chunks(self, item, url, handle, partial, whole, offset: int, end: int | None):
        """One request from ``offset`` (to ``end``, or the end of the file); return the new
        offset. Raises _CorruptChunk at the first chunk that fails its hash."""
        with self._get(url, item, offset, end) as (response, skip):
            if response.status_code == 200:
                end = None  # Range ignored: the whole body comes anyway, so use all of it
            buffer = bytearray()
            for piece in response.iter_bytes():
                if skip:
                    dropped = min(skip, len(piece))
                    piece, skip = piece[dropped:], skip - dropped
                buffer += piece
                while offset < item.size:
                    index = offset // item.chunk_size
                    chunk_end = _chunk_end(item, index)
                    if len(buffer) < chunk_end - offset:
                        break
                    data = bytes(buffer[: chunk_end - offset])
                    del buffer[: chunk_end - offset]
                    if hashlib.sha256(data).hexdigest() != item.chunks[index]:
                        raise _CorruptChunk(index, offset, chunk_end)
                    self._write(handle, data, partial)
                    whole.update(data)
                    offset = chunk_end
                    self.done += len(data)
                    self._report(item, offset)
                    if end is not None and offset >= end:
                        return offset
                if offset >= item.size:
                    return offset
        if offset < item.size:
            # the body ended early: resume from here (counted like a dropped connection)
            raise httpx.RemoteProtocolError(f"response ended at byte {offset} of {item.size}")
        return offset

    # --- whole files ------------------------------------------------------------------------

    def _fetch_whole(self, item: _Item) -> None:
        final = self.dest / item.relative
        partial = _partial(final)
        url = self._url(item.relative)
        start = self.done
        for attempt in range(self.retries + 1):
            self.done = start
            self._report(item, 0)
            digest, size = hashlib.sha256(), 0
            try:
                partial.parent.mkdir(parents=True, exist_ok=True)
                handle = partial.open("wb")
            except OSError as exc:
                raise self._disk_error(exc, partial) from exc
            try:
                with handle, self._get(url, item, 0, None) as (response, _skip):
                    for piece in response.iter_bytes():
                        self._write(handle, piece, partial)
                        digest.update(piece)
                        size += len(piece)
                        self.done = start + min(size, item.size)
                        self._report(item, min(size, item.size))
                    self._flush(handle, partial)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise DownloadError(
                        f"lost the connection to {self.base} while downloading "
                        f"{item.label()} of {self.model_id!r}: {_transport_reason(exc)}"
                    ) from exc
                time.sleep(0.2 * (attempt + 1))
                continue
            except OSError as exc:  # closing a file can report a full disk too
                raise self._disk_error(exc, partial) from exc
            if size == item.size and digest.hexdigest() == item.sha256:
                self._replace(partial, final)
                self.done = start + item.size
                self._report(item, item.size, finished=True)
                return
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{item.label()} of {self.model_id!r} from {self.base} does not match its sha256 "
            f"in the manifest after {self.retries + 1} downloads"
        )

    # --- HTTP -------------------------------------------------------------------------------

    def _url(self, relative: str) -> str:
        return f"{self.base}/{quote(self.model_id)}/{quote(relative)}"

    @contextmanager
    def _get(self, url: str, item: _Item, offset: int, end: int | None):
        """Stream ``url`` from ``offset``; yields (response, bytes to drop from the body)."""
        headers = {}
        if offset > 0 or end is not None:
            headers["Range"] = f"bytes={offset}-" + ("" if end is None else str(end - 1))
        with self.client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status == 404:
                raise DownloadError(
                    f"the model repository at {self.base} has no {item.relative} for model "
                    f"{self.model_id!r} (the manifest lists it)"
                )
            if status == 206 and headers:
                first, total = _content_range(response.headers.get("content-range", ""))
                if first != offset or (total is not None and total != item.size):
                    raise DownloadError(
                        f"{url}: the server sent range {response.headers.get('content-range')!r}"
                        f" for a request from byte {offset} of a {item.size}-byte file"
                    )
                yield response, 0
            elif status == 200:
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) != item.size:
                    raise DownloadError(
                        f"{url} is {length} bytes but the manifest says {item.size}: the "
                        "repository's copy does not match its manifest"
                    )
                yield response, offset  # Range ignored: drop the bytes we already have
            else:
                raise DownloadError(f"{url}: the model repository answered {status}")

    # --- files and progress -----------------------------------------------------------------

    @contextmanager
    def _open_partial(self, partial: Path, item: _Item) -> Iterator[BinaryIO]:
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            handle = partial.open("r+b" if partial.is_file() else "w+b")
        except OSError as exc:
            raise self._disk_error(exc, partial) from exc
        try:
            yield handle
        finally:
            with suppress(OSError):
                handle.close()

    def _write(self, handle: BinaryIO, data: bytes, path: Path) -> None:
        try:
            handle.write(data)
        except OSError as exc:
            raise self._disk_error(exc, path) from exc

    def _flush(self, handle: BinaryIO, path: Path) -> None:
        try:
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise self._disk_error(exc, path) from exc

    def _replace(self, partial: Path, final: Path) -> None:
        try:
            os.replace(partial, final)
        except OSError as exc:
            raise self._disk_error(exc, final) from exc

    def _write_atomically(self, path: Path, data: bytes) -> None:
        partial = _partial(path)
        try:
            with partial.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except OSError as exc:
            raise self._disk_error(exc, partial) from exc

    def _disk_error(self, exc: OSError, path: Path) -> DownloadError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DownloadError(
                f"disk full while writing {path} (downloading {self.model_id!r}); free some "
                "space and run the download again: it resumes where it stopped"
            )
        return DownloadError(f"cannot write {path}: {_os_reason(exc)}")

    def _report(self, item: _Item, file_done: int, *, skipped=False, finished=False) -> None:
        if self.callback is not None:
            self.callback(
                DownloadProgress(
                    model_id=self.model_id,
                    file=item.name,
                    done_bytes=self.done,
                    total_bytes=self.total,
                    file_done_bytes=file_done,
                    file_total_bytes=item.size,
                    skipped=skipped,
                    finished=finished,
                )
            )


class _CorruptChunk(Exception):
    def __init__(self, index: int, start: int, end: int) -> None:
        super().__init__(f"chunk {index} failed its sha256")
        self.index, self.start, self.end = index, start, end


def _chunk_end(item: _Item, index: int) -> int:
    return min((index + 1) * item.chunk_size, item.size)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _safe_relative(path: str) -> str:
    """A manifest path that stays inside the store, or DownloadError."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or pure.is_absolute()
        or any(part in ("", ".", "..") or part.startswith(".") for part in pure.parts)
        or pure.name.endswith(PARTIAL_SUFFIX)
        or pure.name == MANIFEST
    ):
        raise DownloadError(f"invalid manifest: file path {path!r} is not inside the store")
    return pure.as_posix()


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); total None for ``*``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not match:
        return None, None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _transport_reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc or 'refused'})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
