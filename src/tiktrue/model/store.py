"""The block store: one safetensors file per block plus ``manifest.json``.

Layout of ``<data>/models/<model_id>/``::

    manifest.json      model_id, architecture, dtype (of activations and the KV cache),
                       weights (the weight formats), model_chain_order, blocks (file, bytes,
                       sha256, parameters, format), optional encryption header
    config.json        the transformers config
    tokenizer files    tokenizer.json, tokenizer_config.json (with the chat template), ...
    blocks/<name>.safetensors
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig

from tiktrue.model.errors import CorruptBlock, StoreError
from tiktrue.model.quant import dequantize_state

MANIFEST = "manifest.json"
STORE_FORMAT = "tiktrue-block-store/1"
HASH_CHUNK = 4 << 20
CHUNK_SIZE = 4 << 20  # transfers (download, distribution) verify and resume per chunk

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise StoreError(f"dtype {dtype} cannot be stored (use one of {', '.join(DTYPES)})")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise StoreError(f"unknown dtype {name!r} (use one of {', '.join(DTYPES)})") from None


class FileEntry(BaseModel):
    """A file of the store that is not a block (config, tokenizer): fetched with the blocks."""

    bytes: int
    sha256: str


class BlockEntry(BaseModel):
    file: str
    bytes: int  # the file's real size: the planner and the caps count these
    sha256: str
    parameters: int
    format: str = ""  # weight formats of its matrices ("int4", "int4+int8", "fp32"; see quant)
    chunk_size: int = CHUNK_SIZE
    chunks: list[str] = Field(default_factory=list)  # sha256 of each chunk_size piece

    def chunk_count(self) -> int:
        return max(1, -(-self.bytes // self.chunk_size))


class Manifest(BaseModel):
    format: str = STORE_FORMAT
    model_id: str
    architecture: str
    dtype: str  # activations and KV cache: fp32, fp16 or bf16
    weights: str = ""  # weight formats of the whole model ("int4+int8"); "" = dtype (old stores)
    num_layers: int
    hidden_size: int
    vocab_size: int
    model_chain_order: list[str]
    blocks: dict[str, BlockEntry]
    has_tokenizer: bool = False
    files: dict[str, FileEntry] = Field(default_factory=dict)  # by path relative to the store
    source: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    encryption: dict | None = None

    @property
    def total_bytes(self) -> int:
        return sum(b.bytes for b in self.blocks.values())

    @property
    def total_parameters(self) -> int:
        return sum(b.parameters for b in self.blocks.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_chunks(path: Path, chunk_size: int = CHUNK_SIZE) -> tuple[str, list[str]]:
    """The whole file's sha256 and each chunk's, in one read."""
    whole, pieces = hashlib.sha256(), []
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            whole.update(chunk)
            pieces.append(hashlib.sha256(chunk).hexdigest())
    return whole.hexdigest(), pieces or [hashlib.sha256(b"").hexdigest()]


class BlockStore:
    """A verified view of one model's block store on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"no block store at {self.root} (missing {MANIFEST})")
        try:
            self.manifest = Manifest.model_validate_json(manifest_path.read_text("utf-8"))
        except (ValidationError, ValueError) as exc:
            raise StoreError(f"{manifest_path} is not a valid manifest: {exc}") from exc
        if self.manifest.format != STORE_FORMAT:
            raise StoreError(f"{manifest_path}: unsupported store format {self.manifest.format!r}")

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest.dtype)

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.root)

    def block_path(self, name: str) -> Path:
        entry = self._entry(name)
        return self.root / entry.file

    def _entry(self, name: str) -> BlockEntry:
        try:
            return self.manifest.blocks[name]
        except KeyError:
            raise StoreError(f"model {self.model_id!r} has no block {name!r}") from None

    def block_is_valid(self, name: str) -> bool:
        entry = self._entry(name)
        path = self.root / entry.file
        return (
            path.is_file()
            and path.stat().st_size == entry.bytes
            and sha256_file(path) == entry.sha256
        )

    def verify(self, names: Iterable[str] | None = None) -> list[str]:
        """Re-hash the named blocks (all by default); return the names of the bad ones."""
        names = list(self.manifest.model_chain_order if names is None else names)
        return [name for name in names if not self.block_is_valid(name)]

    def load_block(self, name: str, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one block, refusing a file whose hash does not match the manifest."""
        if verify and not self.block_is_valid(name):
            raise CorruptBlock([name], f"{self.block_path(name)} does not match its sha256")
        try:
            return load_file(self.block_path(name))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CorruptBlock([name], str(exc)) from exc

    def load_full_state_dict(self, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """Every weight of the model, quantized ones dequantized to fp32: the reference
        forward and the benchmarks use this."""
        state: dict[str, torch.Tensor] = {}
        for name in self.manifest.model_chain_order:
            state.update(dequantize_state(self.load_block(name, verify=verify)))
        return state

    @property
    def weight_format(self) -> str:
        return self.manifest.weights or self.manifest.dtype


def write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2), "utf-8")


def list_stores(models_root: Path) -> list[BlockStore | StoreError]:
    """Every store under ``models_root``; a broken one is listed as its error, not hidden."""
    found: list[BlockStore | StoreError] = []
    if models_root.is_dir():
        for child in sorted(models_root.iterdir()):
            if (child / MANIFEST).is_file():
                try:
                    found.append(BlockStore(child))
                except StoreError as exc:
                    found.append(exc)
    return found
