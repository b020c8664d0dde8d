"""``tiktrue models import``: a Hugging Face folder or a GGUF file into a block store.

Weights are read one block at a time and written as soon as the block is complete, so importing
needs about one block of memory beyond the source's own reader, not the whole model.
"""

from __future__ import annotations

import shutil
import struct
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from tiktrue.model.catalog import EMBED, HEAD, ArchitectureTemplate, chain_order, template_for
from tiktrue.model.errors import ModelError, StoreError
from tiktrue.model.store import (
    BlockEntry,
    BlockStore,
    FileEntry,
    Manifest,
    dtype_name,
    hash_chunks,
    parse_dtype,
    sha256_file,
    write_manifest,
)

TIED_HEAD = "lm_head.weight"
TIED_SOURCE = "model.embed_tokens.weight"


def import_model(
    source: Path,
    model_id: str,
    models_root: Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> BlockStore:
    """Import ``source`` (HF folder or ``.gguf`` file) as ``<models_root>/<model_id>``."""
    source = Path(source)
    if not source.exists():
        raise StoreError(f"{source} does not exist")
    check_model_id(model_id)
    dest = models_root / model_id
    if dest.exists() and not overwrite:
        raise StoreError(f"model {model_id!r} already exists at {dest} (use --force to replace)")
    partial = models_root / f".{model_id}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "blocks").mkdir(parents=True)
    try:
        manifest = _convert(source, model_id, partial, dtype)
        write_manifest(partial, manifest)
        if dest.exists():
            shutil.rmtree(dest)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return BlockStore(dest)


def _convert(source: Path, model_id: str, partial: Path, dtype: str | None) -> Manifest:
    try:
        if source.is_file() and source.suffix.lower() == ".gguf":
            return _import_gguf(source, model_id, partial, dtype)
        if source.is_dir():
            return _import_hf_folder(source, model_id, partial, dtype)
    except ModelError:
        raise
    except (
        ValueError,
        struct.error,
        OSError,
        EOFError,
        NotImplementedError,
        SafetensorError,
    ) as exc:
        # truncated or damaged source files: the readers raise their own low-level errors
        raise StoreError(f"cannot read {source}: {exc}") from exc
    raise StoreError(f"{source} is neither a Hugging Face model folder nor a .gguf file")


def check_model_id(model_id: str) -> None:
    """Model ids become folder names: letters, digits, '-', '_', '.'; no leading dot."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not model_id or model_id.startswith(".") or set(model_id) - allowed:
        raise StoreError(f"model id {model_id!r} may only use letters, digits, '-', '_' and '.'")


# --- Hugging Face folders -------------------------------------------------------------------


def _import_hf_folder(source: Path, model_id: str, dest: Path, dtype: str | None) -> Manifest:
    if not (source / "config.json").is_file():
        raise StoreError(f"{source} has no config.json")
    config = AutoConfig.from_pretrained(source)
    template = template_for(config.model_type)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise StoreError(f"{source} has no .safetensors weights")
    key_to_shard: dict[str, Path] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                key_to_shard[key] = shard
    target = parse_dtype(dtype) if dtype else _checkpoint_dtype(config)
    by_block = _group_by_block(template, key_to_shard)
    _add_tied_head(config, by_block)
    config.save_pretrained(dest)

    def tensors_of(block: str) -> dict[str, torch.Tensor]:
        out = {}
        for key in by_block[block]:
            stored_as = key if key in key_to_shard else TIED_SOURCE  # a tied head's copy
            with safe_open(key_to_shard[stored_as], framework="pt") as handle:
                out[key] = handle.get_tensor(stored_as)
        return out

    blocks = _write_blocks(config, by_block, tensors_of, dest, target)
    has_tokenizer = _copy_tokenizer(lambda: AutoTokenizer.from_pretrained(source), dest)
    return _manifest(config, model_id, target, blocks, has_tokenizer, str(source), dest)


def _checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if declared in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _group_by_block(template: ArchitectureTemplate, names) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for name in names:
        block = template.block_of(name)
        if block is not None:
            grouped[block].append(name)
    return grouped


def _add_tied_head(config: PretrainedConfig, by_block: dict[str, list[str]]) -> None:
    """Tied embeddings: the head block carries its own copy of the embedding matrix."""
    if TIED_HEAD not in by_block[HEAD]:
        if not getattr(config, "tie_word_embeddings", False):
            raise StoreError("the checkpoint has no lm_head.weight and does not tie embeddings")
        by_block[HEAD].append(TIED_HEAD)


def _write_blocks(config, by_block, tensors_of, dest: Path, target: torch.dtype):
    order = chain_order(config.num_hidden_layers)
    missing = [b for b in order if not by_block.get(b)]
    if missing:
        raise StoreError(f"the checkpoint has no weights for block(s): {', '.join(missing)}")
    entries: dict[str, BlockEntry] = {}
    for block in order:
        tensors = {k: v.to(target).contiguous() for k, v in tensors_of(block).items()}
        entries[block] = _save_block(block, tensors, dest)
    return entries


def _save_block(block: str, tensors: dict[str, torch.Tensor], dest: Path) -> BlockEntry:
    relative = f"blocks/{block}.safetensors"
    path = dest / relative
    save_file(tensors, path)
    whole, chunks = hash_chunks(path)
    return BlockEntry(
        file=relative,
        bytes=path.stat().st_size,
        sha256=whole,
        parameters=sum(t.numel() for t in tensors.values()),
        chunks=chunks,
    )


def _copy_tokenizer(load, dest: Path) -> bool:
    try:
        tokenizer = load()
    except (OSError, ValueError):
        return False
    tokenizer.save_pretrained(dest)
    return True


def _manifest(config, model_id, target, blocks, has_tokenizer, source, dest: Path) -> Manifest:
    files = {
        path.name: FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
        for path in sorted(dest.iterdir())
        if path.is_file()
    }
    return Manifest(
        files=files,
        model_id=model_id,
        architecture=config.model_type,
        dtype=dtype_name(target),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        model_chain_order=chain_order(config.num_hidden_layers),
        blocks=blocks,
        has_tokenizer=has_tokenizer,
        source=source,
    )


# --- GGUF ---------------------------------------------------------------------------------


def _import_gguf(source: Path, model_id: str, dest: Path, dtype: str | None) -> Manifest:
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    folder, name = source.parent, source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    template = template_for(config.model_type)
    target = parse_dtype(dtype) if dtype else torch.float32
    config.save_pretrained(dest)

    # The name map comes from a weightless (meta) model, as transformers itself does it.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(source), return_tensors=False)
    reader = GGUFReader(str(source))
    arch = parsed["config"]["model_type"]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    name_map = get_gguf_hf_weights_map(skeleton, processor)

    expected = {
        b: set(keys) for b, keys in _group_by_block(template, skeleton.state_dict()).items()
    }
    tied = all(t.name != "output.weight" for t in reader.tensors)  # as transformers decides
    if tied:
        expected[HEAD].discard(TIED_HEAD)
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    entries: dict[str, BlockEntry] = {}
    tied_embedding: torch.Tensor | None = None

    def flush_if_complete(block: str) -> None:
        nonlocal tied_embedding
        tensors = pending.get(block)
        if tensors is None or set(tensors) != expected[block]:
            return
        if block == HEAD and tied:
            if tied_embedding is None:
                return  # the head copies the embedding matrix: wait for it
            tensors[TIED_HEAD] = tied_embedding
        entries[block] = _save_block(block, {k: v.to(target) for k, v in tensors.items()}, dest)
        if block == EMBED and tied:
            tied_embedding = tensors[TIED_SOURCE]
        del pending[block]

    for tensor in reader.tensors:
        result = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=name_map,
            parsed_parameters=parsed,
        )
        hf_name = name_map.get(result.name)
        block = template.block_of(hf_name) if hf_name else None
        if block is None:
            continue
        pending[block][hf_name] = torch.from_numpy(result.weights.copy())
        flush_if_complete(block)
        if block == EMBED:
            flush_if_complete(HEAD)
    missing = [b for b in chain_order(config.num_hidden_layers) if b not in entries]
    if missing:
        raise StoreError(f"{source}: no complete weights for block(s): {', '.join(missing)}")
    has_tokenizer = _copy_tokenizer(
        lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), dest
    )
    return _manifest(config, model_id, target, entries, has_tokenizer, str(source), dest)
