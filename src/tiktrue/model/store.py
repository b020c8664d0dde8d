"""The block store: one safetensors file per block plus ``manifest.json``.

Layout of ``<data>/models/<model_id>/``::

    manifest.json      model_id, architecture, dtype (of activations and the KV cache),
                       weights (the weight formats), model_chain_order, blocks (file, bytes,
                       sha256, parameters, format), optional encryption header
    config.json        the transformers config
    generation_config.json   the model's own sampling settings, when it has some (copied from
                       a Hugging Face folder, or a GGUF's ``general.sampling.*`` metadata)
    sampling.json      the admin's sampling settings for this model on this PC (not in the
                       manifest: a choice of this PC's admin, not part of the model)
    tokenizer files    tokenizer.json, tokenizer_config.json (with the chat template), ...
    blocks/<name>.safetensors          a block as imported or received in the clear, or
    blocks/<name>.safetensors.sealed   the same bytes sealed at rest (AES-256-GCM, see below)

**One verification.** ``check_file`` is the only code that says whether a block file holds
its block: it streams the file's plaintext (opening sealed chunks on the way), and compares
size and sha256 with the manifest. ``BlockStore.verify`` (``tiktrue models verify``), the
loader, the receiver of pushed blocks, the config sync and the node's block guard all call it.

**Private copies, not memory maps.** ``load_block`` reads a block's bytes once into this
process's own memory, hashes exactly those bytes and builds the tensors from them, so what
was verified is what runs: a later write to the file (a bit flipped on disk, an editor, a
half-finished copy) never reaches a served weight, and a truncated file cannot fault the
process (a memory-mapped one raises SIGBUS when its pages vanish). The trade-off, measured
by ``bench/span_memory.py``: layer weights are resident either way once a step has run, but
an embedding matrix is now resident whole rather than only the rows of tokens seen, clean
file pages can no longer be dropped by the OS under memory pressure, and two spans of one
model in one process do not share pages. Memory-mapping again (issue 11) would need another
guarantee that a file never changes under a running span, e.g. a private read-only copy of
each block file that only this process can write, re-hashed by the guard; sealed blocks
must be decrypted into memory anyway.

**Sealed at rest.** A network may ask its workers to keep blocks encrypted (``Cipher``: the
network's AES-256-GCM key, ``security.crypto_layer.BlockCipher``). A sealed file is
``SEAL_MAGIC``, a 4-byte little-endian header length, a JSON header (``network_id`` whose key
seals it, ``chunk_size``), then each ``chunk_size`` piece of the block sealed alone with the
associated data ``chunk_aad(model_id, file, index)``, so pieces cannot be swapped, and the
whole plaintext is checked against the manifest's sha256, so none can be dropped. The key
lives in ``<data>/networks/<network_id>/block_key`` (owner-only): sealing protects a copied
models folder or disk image without that file, not a copied data directory. How a node keeps a
file is said by the file itself, not by the manifest's ``encryption`` field: the manifest
describes the model's plaintext, identical on every node and in every network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load as load_safetensors
from transformers import AutoConfig, PretrainedConfig

from tiktrue.model.errors import CorruptBlock, StoreError
from tiktrue.model.quant import dequantize_state
from tiktrue.model.sampling import SAMPLING_FIELDS, SamplingDefaults

log = logging.getLogger("tiktrue.model")

MANIFEST = "manifest.json"
STORE_FORMAT = "tiktrue-block-store/1"
HASH_CHUNK = 4 << 20
CHUNK_SIZE = 4 << 20  # transfers (download, distribution) verify and resume per chunk
SEALED_SUFFIX = ".sealed"
SEAL_MAGIC = b"TTSEAL1\n"
SEAL_OVERHEAD = 12 + 16  # AES-GCM nonce and tag, per sealed chunk
MAX_SEAL_HEADER = 1 << 12
GENERATION_CONFIG = "generation_config.json"  # the model's own (Hugging Face's file and names)
ADMIN_SAMPLING = "sampling.json"  # this PC's admin's choice for the model

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


# --- sealed blocks ----------------------------------------------------------------------------


class Cipher(Protocol):
    """AES-256-GCM with one network's block key (``security.crypto_layer.BlockCipher``)."""

    def seal(self, data: bytes, associated_data: bytes) -> bytes: ...

    def open(self, blob: bytes, associated_data: bytes) -> bytes:
        """The plaintext; raises ``ValueError`` when the blob does not authenticate."""
        ...


Keyring = Callable[[str], "Cipher | None"]  # network id -> its cipher (None: no key here)


def chunk_aad(model_id: str, path: str, index: int) -> bytes:
    """Binds each encrypted chunk to its place (in transfer and at rest), so chunks cannot be
    swapped or replayed."""
    return f"{model_id}/{path}/{index}".encode()


def sealed_path(path: Path) -> Path:
    return path.with_name(path.name + SEALED_SUFFIX)


def seal_header(network_id: str, chunk_size: int) -> bytes:
    header = json.dumps({"network_id": network_id, "chunk_size": chunk_size}).encode()
    return SEAL_MAGIC + struct.pack("<I", len(header)) + header


def sealed_chunk_offset(header: bytes, index: int, chunk_size: int) -> int:
    """Where sealed chunk ``index`` starts (every chunk but the last is ``chunk_size``)."""
    return len(header) + index * (chunk_size + SEAL_OVERHEAD)


def _read_seal_header(handle: BinaryIO) -> tuple[str, int]:
    head = handle.read(len(SEAL_MAGIC) + 4)
    if len(head) < len(SEAL_MAGIC) + 4 or not head.startswith(SEAL_MAGIC):
        raise ValueError("not a sealed block (bad magic)")
    (length,) = struct.unpack("<I", head[len(SEAL_MAGIC) :])
    if length > MAX_SEAL_HEADER:
        raise ValueError(f"sealed header of {length} bytes")
    header = json.loads(handle.read(length))
    network_id, chunk_size = header["network_id"], header["chunk_size"]
    if not isinstance(network_id, str) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError("sealed header names no network or chunk size")
    return network_id, chunk_size


def iter_plain_chunks(
    path: Path, model_id: str, entry: BlockEntry, keyring: Keyring | None, *, whole: bool = False
) -> Iterator[bytes]:
    """The plaintext of a block file, chunk by chunk; ``whole``: a plain file in one piece.
    A sealed file is told by its first bytes (a safetensors file starts with its header's
    length, never with ``SEAL_MAGIC``), so ``.partial`` files read the same way. Raises
    ``ValueError`` (damage, a chunk that does not authenticate, no key) or ``OSError``."""
    with path.open("rb") as handle:
        sealed = handle.read(len(SEAL_MAGIC)) == SEAL_MAGIC
        handle.seek(0)
        if not sealed:
            size = -1 if whole else entry.chunk_size
            while chunk := handle.read(size):
                yield chunk
            return
        network_id, chunk_size = _read_seal_header(handle)
        cipher = keyring(network_id) if keyring is not None else None
        if cipher is None:
            raise ValueError(f"sealed with the key of network {network_id}, which this node lacks")
        index = 0
        while blob := handle.read(chunk_size + SEAL_OVERHEAD):
            yield cipher.open(blob, chunk_aad(model_id, entry.file, index))
            index += 1


def check_file(
    path: Path,
    manifest: Manifest,
    name: str,
    keyring: Keyring | None = None,
    *,
    pace: Callable[[int], None] | None = None,
) -> str | None:
    """Whether ``path`` holds block ``name`` of ``manifest``: None, or what is wrong with it.
    The one verification of a block (see the module's docstring). ``pace(n)`` is called after
    each piece of ``n`` bytes (a background check sleeps there to bound its CPU and disk use)."""
    try:
        block_plaintext(path, manifest, name, keyring, keep=False, pace=pace)
    except CorruptBlock as exc:
        return exc.detail
    return None


def block_plaintext(
    path: Path,
    manifest: Manifest,
    name: str,
    keyring: Keyring | None,
    *,
    keep: bool = True,
    compare: bool = True,
    pace: Callable[[int], None] | None = None,
) -> bytes:
    """The plaintext of block ``name`` read from ``path`` (``keep``; else b""), once its size
    and sha256 match the manifest (``compare``). Raises ``CorruptBlock`` with a ``reason``:
    missing, unreadable, unsealable, wrong_size, sha256_mismatch."""
    entry = manifest.blocks[name]
    if not path.is_file():
        raise CorruptBlock([name], f"{path} is missing", reason="missing")
    digest, size, parts = hashlib.sha256(), 0, []
    try:
        for chunk in iter_plain_chunks(path, manifest.model_id, entry, keyring, whole=keep):
            if compare:
                digest.update(chunk)
            size += len(chunk)
            if keep:
                parts.append(chunk)
            if pace is not None:
                pace(len(chunk))
    except OSError as exc:
        raise CorruptBlock([name], f"{path} cannot be read: {exc}", reason="unreadable") from exc
    except (ValueError, KeyError, TypeError) as exc:  # damaged header, chunk that won't open
        raise CorruptBlock([name], f"{path}: {exc}", reason="unsealable") from exc
    if compare and size != entry.bytes:
        raise CorruptBlock(
            [name], f"{path} holds {size} bytes, not {entry.bytes}", reason="wrong_size"
        )
    if compare and digest.hexdigest() != entry.sha256:
        raise CorruptBlock([name], f"{path} does not match its sha256", reason="sha256_mismatch")
    return b"".join(parts)  # one part (a plain file): that very object, no copy


class BlockStore:
    """A verified view of one model's block store on disk. ``keyring`` opens sealed blocks."""

    def __init__(self, root: Path, *, keyring: Keyring | None = None) -> None:
        self.root = Path(root)
        self.keyring = keyring
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
        """Where the block's file lives in the clear (it may be sealed instead: block_file)."""
        entry = self._entry(name)
        return self.root / entry.file

    def block_file(self, name: str) -> Path:
        """The block's file as it is held: sealed if there is a sealed one, else plain."""
        plain = self.block_path(name)
        sealed = sealed_path(plain)
        return sealed if sealed.is_file() else plain

    def has_block(self, name: str) -> bool:
        """A file for the block is there (whether it verifies is ``check_block``'s word)."""
        return self.block_file(name).is_file()

    def _entry(self, name: str) -> BlockEntry:
        try:
            return self.manifest.blocks[name]
        except KeyError:
            raise StoreError(f"model {self.model_id!r} has no block {name!r}") from None

    def check_block(self, name: str, *, pace: Callable[[int], None] | None = None) -> str | None:
        """None when the block's file matches the manifest, else what is wrong with it."""
        self._entry(name)
        return check_file(self.block_file(name), self.manifest, name, self.keyring, pace=pace)

    def verify(self, names: Iterable[str] | None = None) -> list[str]:
        """Re-hash the named blocks (all by default); return the names of the bad ones."""
        names = list(self.manifest.model_chain_order if names is None else names)
        return [name for name in names if self.check_block(name) is not None]

    def read_block(self, name: str, *, verify: bool = True) -> bytes:
        """The block file's plaintext in this process's memory, checked against the manifest
        (``CorruptBlock`` names the block and says why)."""
        self._entry(name)
        return block_plaintext(
            self.block_file(name), self.manifest, name, self.keyring, compare=verify
        )

    def load_block(self, name: str, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one block, built from a private, verified copy of its bytes (never
        a memory map of the file: see the module's docstring)."""
        data = self.read_block(name, verify=verify)
        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CorruptBlock([name], str(exc), reason="unparsable") from exc

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

    # --- sampling defaults -------------------------------------------------------------------

    def model_sampling(self) -> dict:
        """The sampling settings the model itself recommends: the fields of its
        ``generation_config.json`` that ``SamplingDefaults`` knows (as vLLM reads it: the
        values present, ``do_sample`` ignored); a value out of bounds is left out, logged."""
        return _sampling_fields(self.root / GENERATION_CONFIG)

    def admin_sampling(self) -> dict:
        """What this PC's admin chose for the model (``tiktrue models defaults``)."""
        return _sampling_fields(self.root / ADMIN_SAMPLING)

    def sampling_defaults(self) -> SamplingDefaults:
        """What a request leaves out: the admin's choice, else the model's own, else the
        defaults of ``tiktrue.limits`` (llama.cpp's)."""
        return SamplingDefaults(**{**self.model_sampling(), **self.admin_sampling()})

    def sampling_files_stamp(self) -> tuple:
        """Changes whenever ``sampling_defaults`` may (for callers that cache it)."""
        stamps = []
        for name in (GENERATION_CONFIG, ADMIN_SAMPLING):
            try:
                info = (self.root / name).stat()
                stamps.append((info.st_mtime_ns, info.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def set_admin_sampling(self, values: dict | None) -> SamplingDefaults:
        """Keep ``values`` (fields of ``SamplingDefaults``; checked, ``StoreError`` saying what
        is wrong) as the admin's choice for this model; None or {} goes back to the model's
        own. Returns the defaults now in force."""
        path = self.root / ADMIN_SAMPLING
        values = {k: v for k, v in (values or {}).items() if v is not None}
        unknown = sorted(set(values) - set(SAMPLING_FIELDS))
        if unknown:
            raise StoreError(
                f"unknown sampling setting(s) {', '.join(unknown)} "
                f"(known: {', '.join(SAMPLING_FIELDS)})"
            )
        try:
            checked = SamplingDefaults(**values).model_dump(include=set(values))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise StoreError(f"{first['loc'][0]}: {first['msg']}") from None
        if not checked:
            path.unlink(missing_ok=True)
        else:
            _write_atomically(path, json.dumps(checked, indent=2).encode())
        return self.sampling_defaults()

    def add_file(self, name: str, data: bytes) -> None:
        """Write a file of the model (not a block) and record it in the manifest, so copies of
        the store (downloads, distribution) get it too."""
        _write_atomically(self.root / name, data)
        digest = hashlib.sha256(data).hexdigest()
        self.manifest.files[name] = FileEntry(bytes=len(data), sha256=digest)
        _write_atomically(
            self.root / MANIFEST, json.dumps(self.manifest.model_dump(), indent=2).encode()
        )


def _sampling_fields(path: Path) -> dict:
    """The ``SamplingDefaults`` fields a JSON file holds (each checked on its own)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s): its sampling settings are ignored", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    found = {}
    for name in SAMPLING_FIELDS:
        if data.get(name) is None:
            continue
        try:
            found[name] = getattr(SamplingDefaults(**{name: data[name]}), name)
        except ValidationError:
            log.warning("%s: %s=%r is out of bounds, left out", path, name, data[name])
    return found


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


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
