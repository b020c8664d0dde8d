"""A worker receiving blocks: chunk by chunk, each verified, into ``.partial`` files.

A block becomes visible under its final name only once its whole sha256 matches the manifest;
a worker never keeps a block it cannot verify.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tiktrue.model.store import CHUNK_SIZE, Manifest, sha256_file


class ReceiveError(Exception):
    code = "bad_chunk"


class DiskCapExceeded(ReceiveError):
    code = "disk_cap"


def _target(manifest: Manifest, path: str) -> tuple[str, int, list[str], int, str]:
    """(kind, chunk size, chunk hashes, total bytes, whole sha256) of a path of the store."""
    for entry in manifest.blocks.values():
        if entry.file == path:
            return "block", entry.chunk_size, entry.chunks, entry.bytes, entry.sha256
    if path in manifest.files:
        item = manifest.files[path]
        return "file", CHUNK_SIZE, [], item.bytes, item.sha256
    raise ReceiveError(f"{path} is not part of model {manifest.model_id}")


def _valid(root: Path, path: str, size: int, sha: str) -> bool:
    final = root / path
    return final.is_file() and final.stat().st_size == size and sha256_file(final) == sha


def held(root: Path, manifest: Manifest) -> dict:
    """What this node already holds of a model: verified blocks and files, partial chunks."""
    blocks = [
        name for name, e in manifest.blocks.items() if _valid(root, e.file, e.bytes, e.sha256)
    ]
    files = [name for name, f in manifest.files.items() if _valid(root, name, f.bytes, f.sha256)]
    partial = {}
    for entry in manifest.blocks.values():
        part = root / (entry.file + ".partial")
        if part.is_file() and entry.chunks:
            partial[entry.file] = _good_chunks(part, entry.chunk_size, entry.chunks)
    return {"blocks": blocks, "files": files, "partial": partial}


def _good_chunks(part: Path, size: int, hashes: list[str]) -> int:
    good = 0
    with part.open("rb") as handle:
        for expected in hashes:
            chunk = handle.read(size)
            if not chunk or hashlib.sha256(chunk).hexdigest() != expected:
                break
            good += 1
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
) -> bool:
    """Store one chunk; returns True when the file is complete and verified."""
    kind, size, hashes, total, sha = _target(manifest, path)
    if kind == "block":
        if not 0 <= index < len(hashes):
            raise ReceiveError(f"{path} has {len(hashes)} chunks, not {index + 1}")
        if hashlib.sha256(data).hexdigest() != hashes[index]:
            raise ReceiveError(f"chunk {index} of {path} does not match its sha256")
    final = root / path
    part = final.with_name(final.name + ".partial")
    part.parent.mkdir(parents=True, exist_ok=True)
    if index == 0:
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
        part.write_bytes(b"")
    have = part.stat().st_size if part.exists() else 0
    if have < index * size:
        raise ReceiveError(f"chunk {index} of {path} arrived before the chunks ahead of it")
    with part.open("r+b") as handle:
        handle.seek(index * size)
        handle.write(data)
        handle.truncate()
    if not last:
        return False
    if part.stat().st_size != total or sha256_file(part) != sha:
        part.unlink(missing_ok=True)
        raise ReceiveError(f"{path} does not match its sha256 once complete; sent again from 0")
    part.replace(final)
    return True
