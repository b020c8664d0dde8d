"""A worker receiving blocks: chunk by chunk, each verified, into ``.partial`` files.

A block becomes visible under its final name only once the whole file passes the store's one
verification (``model.store.check_file``); a worker never keeps a block it cannot verify.
With ``seal_for`` (a network that keeps its blocks encrypted at rest) each chunk is sealed
with that network's key before it touches the disk, partial file included, and the block
lands as ``<file>.sealed``; the other form of the same block, if any, goes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tiktrue.model.store import (
    CHUNK_SIZE,
    Keyring,
    Manifest,
    check_file,
    chunk_aad,
    iter_plain_chunks,
    seal_header,
    sealed_chunk_offset,
    sealed_path,
    sha256_file,
)


class ReceiveError(Exception):
    code = "bad_chunk"


class DiskCapExceeded(ReceiveError):
    code = "disk_cap"


def _target(manifest: Manifest, path: str) -> tuple[str | None, int, list[str], int, str]:
    """(block name or None for other files, chunk size, chunk hashes, total bytes, sha256)."""
    for name, entry in manifest.blocks.items():
        if entry.file == path:
            return name, entry.chunk_size, entry.chunks, entry.bytes, entry.sha256
    if path in manifest.files:
        item = manifest.files[path]
        return None, CHUNK_SIZE, [], item.bytes, item.sha256
    raise ReceiveError(f"{path} is not part of model {manifest.model_id}")


def _partial(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def _held_form(root: Path, path: str, sealed: bool) -> Path:
    final = root / path
    return sealed_path(final) if sealed else final


def _valid_file(root: Path, path: str, size: int, sha: str) -> bool:
    final = root / path
    return final.is_file() and final.stat().st_size == size and sha256_file(final) == sha


def held(
    root: Path, manifest: Manifest, *, keyring: Keyring | None = None, seal_for: str | None = None
) -> dict:
    """What this node already holds of a model: verified blocks (in either form) and files,
    and how many good chunks each partial block of the form ``seal_for`` asks for has."""
    blocks = []
    for name, entry in manifest.blocks.items():
        sealed = _held_form(root, entry.file, True)
        path = sealed if sealed.is_file() else root / entry.file
        if check_file(path, manifest, name, keyring) is None:
            blocks.append(name)
    files = [
        name for name, f in manifest.files.items() if _valid_file(root, name, f.bytes, f.sha256)
    ]
    partial = {}
    for entry in manifest.blocks.values():
        part = _partial(_held_form(root, entry.file, seal_for is not None))
        if part.is_file() and entry.chunks:
            partial[entry.file] = _good_chunks(part, manifest, entry, keyring)
    return {"blocks": blocks, "files": files, "partial": partial}


def _good_chunks(part: Path, manifest: Manifest, entry, keyring: Keyring | None) -> int:
    good = 0
    try:
        chunks = iter_plain_chunks(part, manifest.model_id, entry, keyring)
        for expected, chunk in zip(entry.chunks, chunks, strict=False):
            if hashlib.sha256(chunk).hexdigest() != expected:
                break
            good += 1
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the chunks before the damage are good
    return good


def receive_chunk(
    root: Path,
    manifest: Manifest,
    path: str,
    index: int,
    data: bytes,
    last: bool,
    *,
    disk_cap: int | None = None,
    keyring: Keyring | None = None,
    seal_for: str | None = None,
) -> bool:
    """Store one chunk (sealed with ``seal_for``'s key when given: blocks only); returns True
    when the file is complete and verified."""
    name, size, hashes, total, sha = _target(manifest, path)
    sealed = name is not None and seal_for is not None
    if name is not None:
        if not 0 <= index < len(hashes):
            raise ReceiveError(f"{path} has {len(hashes)} chunks, not {index + 1}")
        if hashlib.sha256(data).hexdigest() != hashes[index]:
            raise ReceiveError(f"chunk {index} of {path} does not match its sha256")
    final = _held_form(root, path, sealed)
    part = _partial(final)
    part.parent.mkdir(parents=True, exist_ok=True)
    header, offset, blob = b"", index * size, data
    if sealed:
        cipher = keyring(seal_for) if keyring is not None else None
        if cipher is None:
            raise ReceiveError(f"this node holds no block key for network {seal_for}")
        header = seal_header(seal_for, size)
        offset = sealed_chunk_offset(header, index, size)
        blob = cipher.seal(data, chunk_aad(manifest.model_id, path, index))
    if index == 0:
        _check_room(root, path, total, disk_cap)
        part.write_bytes(header)
    have = part.stat().st_size if part.exists() else 0
    if have < offset:
        raise ReceiveError(f"chunk {index} of {path} arrived before the chunks ahead of it")
    with part.open("r+b") as handle:
        handle.seek(offset)
        handle.write(blob)
        handle.truncate()
    if not last:
        return False
    problem = check_file(part, manifest, name, keyring) if name is not None else None
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ReceiveError(f"{path} does not verify once complete ({problem}); sent again from 0")
    if name is None and (part.stat().st_size != total or sha256_file(part) != sha):
        part.unlink(missing_ok=True)
        raise ReceiveError(f"{path} does not match its sha256 once complete; sent again from 0")
    part.replace(final)
    if name is not None:  # one form per block: the other one is stale (or was the bad one)
        _held_form(root, path, not sealed).unlink(missing_ok=True)
    return True


def _check_room(root: Path, path: str, total: int, disk_cap: int | None) -> None:
    if disk_cap is not None:
        used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        if used + total > disk_cap:
            raise DiskCapExceeded(
                f"{path} ({total} bytes) would pass this node's disk cap of {disk_cap} bytes "
                f"({used} used)"
            )
    free = shutil.disk_usage(root).free
    if free < total:
        raise DiskCapExceeded(f"{path} needs {total} bytes, the disk has {free} free")
