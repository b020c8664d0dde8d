"""Distribution: the admin pushes each worker the blocks of its span over the control channel.

Chunks are encrypted with the network's AES-256-GCM block key (inside TLS), each verified by
the worker against the manifest's chunk hashes; an interrupted push resumes from the worker's
last good chunk, and a block the worker already holds verified is not sent again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiktrue.control.network_manager import block_key
from tiktrue.model.store import CHUNK_SIZE, BlockStore, chunk_aad
from tiktrue.node.control_link import ControlLink
from tiktrue.protocol.network_config import NodeEntry
from tiktrue.security.crypto_layer import encrypt_block_transfer
from tiktrue.security.node_tls import NetworkCredentials


@dataclass
class PushProgress:
    node_id: str
    block: str
    sent_bytes: int  # of this push, all blocks
    total_bytes: int  # of this push
    skipped: bool = False


async def push_blocks(
    data_dir: Path,
    network_id: str,
    store: BlockStore,
    node: NodeEntry,
    blocks: list[str],
    *,
    progress: Callable[[PushProgress], None] | None = None,
) -> dict[str, int]:
    """Give ``node`` the store's manifest, small files and ``blocks``; returns bytes sent."""
    credentials = NetworkCredentials.load(data_dir, network_id)
    key = block_key(data_dir, network_id)
    model_id = store.model_id
    sent: dict[str, int] = {}
    async with ControlLink.to(node, credentials) as link:
        await link.call(
            "manifest_push",
            network_id=network_id,
            model_id=model_id,
            manifest=store.manifest.model_dump(),
        )
        held = await link.call("blocks_held", network_id=network_id, model_id=model_id)
        files = [(name, None) for name in store.manifest.files if name not in held["files"]]
        todo = files + [(b, store.manifest.blocks[b]) for b in blocks if b not in held["blocks"]]
        total = sum(
            (entry.bytes if entry else store.manifest.files[name].bytes) for name, entry in todo
        )
        done = 0
        for block in blocks:
            if block in held["blocks"] and progress:
                progress(PushProgress(node.node_id, block, done, total, skipped=True))
        for name, entry in todo:
            path = entry.file if entry else name
            chunk_size = entry.chunk_size if entry else CHUNK_SIZE
            file_size = (store.root / path).stat().st_size
            count = max(1, -(-file_size // chunk_size))  # an empty file is one empty chunk
            first = held["partial"].get(path, 0)  # resume after the worker's good chunks
            with (store.root / path).open("rb") as handle:
                handle.seek(first * chunk_size)
                for index in range(first, count):
                    chunk = handle.read(chunk_size)
                    payload = encrypt_block_transfer(chunk, key, chunk_aad(model_id, path, index))
                    await link.call(
                        "chunk",
                        payload,
                        network_id=network_id,
                        model_id=model_id,
                        path=path,
                        index=index,
                        last=index == count - 1,
                    )
                    done += len(chunk)
                    sent[name] = sent.get(name, 0) + len(chunk)
                    if progress:
                        progress(PushProgress(node.node_id, name, done, total))
    return sent
