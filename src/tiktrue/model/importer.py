"""``tiktrue models import``: a Hugging Face folder or a GGUF file into a block store.

Weights are read one block at a time and written as soon as the block is complete, so importing
needs about one block of memory beyond the source's own reader, not the whole model.

Weight formats (``dtype``): ``fp32``, ``fp16``, ``bf16`` convert every weight; ``int8`` and
``int4`` quantize the matrices (see ``quant``) and run with bf16 activations. By default a Hugging
Face folder keeps its checkpoint's float dtype and a GGUF keeps its quantized weights: Q4_0 / Q4_1
exactly as ``int4``, Q8_0 as ``int8``, other quantized types as the nearest of the two, float
tensors as fp32.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from tiktrue.model.catalog import EMBED, HEAD, ArchitectureTemplate, chain_order, template_for
from tiktrue.model.errors import ModelError, StoreError
from tiktrue.model.quant import (
    FLOAT_FORMATS,
    GGUF_Q4_0,
    GGUF_Q4_1,
    GGUF_Q8_0,
    INT4,
    INT8,
    WEIGHT_FORMATS,
    formats_of,
    gguf_q4_to_int4,
    quantize,
)
from tiktrue.model.store import (
    GENERATION_CONFIG,
    BlockEntry,
    BlockStore,
    FileEntry,
    Manifest,
    hash_chunks,
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
    if dtype is not None and dtype not in WEIGHT_FORMATS:
        raise StoreError(f"unknown dtype {dtype!r} (use one of {', '.join(WEIGHT_FORMATS)})")
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
    target = dtype or _checkpoint_dtype(config)
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
    if (source / GENERATION_CONFIG).is_file():  # the model's own sampling settings
        shutil.copyfile(source / GENERATION_CONFIG, dest / GENERATION_CONFIG)
    return _manifest(config, model_id, blocks, has_tokenizer, str(source), dest)


def _checkpoint_dtype(config: PretrainedConfig) -> str:
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return names.get(declared, "fp32")


def _compute_dtype(formats: set[str]) -> str:
    """Activations run in the float format of the weights; quantized weights want bf16."""
    floats = formats & set(FLOAT_FORMATS)
    if formats - floats or len(floats) != 1:
        return "bf16"
    return floats.pop()


def _stored(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """``tensors`` in weight format ``fmt``; vectors (norms, biases) stay fp32 when quantized."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 or fmt in FLOAT_FORMATS:
            out.update(quantize(name, tensor, fmt))  # a float format only converts
        else:
            out[name] = tensor.to(torch.float32).contiguous()
    return out


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


def _write_blocks(config, by_block, tensors_of, dest: Path, target: str):
    order = chain_order(config.num_hidden_layers)
    missing = [b for b in order if not by_block.get(b)]
    if missing:
        raise StoreError(f"the checkpoint has no weights for block(s): {', '.join(missing)}")
    entries: dict[str, BlockEntry] = {}
    for block in order:
        entries[block] = _save_block(block, _stored(tensors_of(block), target), dest)
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
        parameters=_parameters(tensors),
        chunks=chunks,
        format=formats_of(tensors),
    )


def _parameters(tensors: dict[str, torch.Tensor]) -> int:
    count = 0
    for key, tensor in tensors.items():
        if key.endswith(".int4"):
            count += tensor.numel() * 2
        elif not key.endswith((".int4_sz", ".int8_scale")):
            count += tensor.numel()
    return count


def _copy_tokenizer(load, dest: Path) -> bool:
    try:
        tokenizer = load()
    except (OSError, ValueError):
        return False
    tokenizer.save_pretrained(dest)
    return True


def _manifest(config, model_id, blocks, has_tokenizer, source, dest: Path) -> Manifest:
    formats = {f for entry in blocks.values() for f in entry.format.split("+")}
    files = {
        path.name: FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
        for path in sorted(dest.iterdir())
        if path.is_file()
    }
    return Manifest(
        files=files,
        model_id=model_id,
        architecture=config.model_type,
        dtype=_compute_dtype(formats),
        weights="+".join(sorted(formats)),
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
    # block -> weight name -> that weight's stored tensors (one, or a quantized pair)
    pending: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    entries: dict[str, BlockEntry] = {}
    tied_embedding: dict[str, torch.Tensor] | None = None

    def flush_if_complete(block: str) -> None:
        nonlocal tied_embedding
        weights = pending.get(block)
        if weights is None or set(weights) != expected[block]:
            return
        if block == HEAD and tied:
            if tied_embedding is None:
                return  # the head copies the embedding matrix: wait for it
            weights[TIED_HEAD] = {
                TIED_HEAD + k[len(TIED_SOURCE) :]: v for k, v in tied_embedding.items()
            }
        tensors = {k: v for stored in weights.values() for k, v in stored.items()}
        entries[block] = _save_block(block, tensors, dest)
        if block == EMBED and tied:
            tied_embedding = weights[TIED_SOURCE]
        del pending[block]

    for tensor in reader.tensors:
        floats = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=floats, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters=parsed
        )
        hf_name = name_map.get(result.name)
        block = template.block_of(hf_name) if hf_name else None
        if block is None:
            continue
        weights = torch.from_numpy(result.weights.copy())
        fmt = _gguf_target(tensor.tensor_type, dtype) if weights.dim() == 2 else "fp32"
        stored = None
        if fmt == INT4 and tensor.tensor_type.name in (GGUF_Q4_0, GGUF_Q4_1):
            stored = _exact_int4(tensor, floats, result, hf_name, processor, name_map, parsed)
        pending[block][hf_name] = stored or _stored({hf_name: weights}, fmt)
        flush_if_complete(block)
        if block == EMBED:
            flush_if_complete(HEAD)
    missing = [b for b in chain_order(config.num_hidden_layers) if b not in entries]
    if missing:
        raise StoreError(f"{source}: no complete weights for block(s): {', '.join(missing)}")
    has_tokenizer = _copy_tokenizer(
        lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), dest
    )
    sampling = gguf_sampling(reader)
    if sampling:
        (dest / GENERATION_CONFIG).write_text(json.dumps(sampling, indent=2), "utf-8")
    return _manifest(config, model_id, entries, has_tokenizer, str(source), dest)


# llama.cpp's names for a model's recommended sampling (gguf ``Keys.General.SAMPLING_*``),
# and Hugging Face's for the same settings
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def gguf_sampling(reader) -> dict:
    """The sampling settings a GGUF recommends (its ``general.sampling.*`` metadata, which
    llama.cpp's converter writes from the model's generation_config.json), in Hugging Face's
    names; {} when it carries none (most GGUFs so far)."""
    found = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        field = reader.fields.get(key)
        if field is None:
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, TypeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = value
    return found


def _gguf_target(kind, dtype: str | None) -> str:
    """The stored format of one GGUF matrix: ``dtype`` if given, else the nearest kept one."""
    from gguf import GGML_QUANT_SIZES

    if dtype is not None:
        return dtype
    if kind.name in ("F32", "F16", "BF16", "F64"):
        return "fp32"
    if kind.name == GGUF_Q8_0:
        return INT8
    block_size, type_size = GGML_QUANT_SIZES[kind]
    return INT4 if type_size * 8 / block_size <= 5 else INT8


def _exact_int4(tensor, floats, result, hf_name, processor, name_map, parsed):
    """A Q4_0 / Q4_1 matrix as ``int4`` without re-quantizing, or ``None`` where transformers'
    processing of this tensor is more than a reordering of its rows (then it is re-quantized)."""
    rows = floats.shape[0]
    index = processor.process(
        weights=np.arange(rows, dtype=np.float64)[:, None],
        name=tensor.name,
        tensor_key_mapping=name_map,
        parsed_parameters=parsed,
    ).weights
    order = np.asarray(index).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        return None
    order = order.astype(np.int64)
    if not np.array_equal(floats[order], result.weights):
        return None
    packed, scale_zero = gguf_q4_to_int4(np.asarray(tensor.data), tensor.tensor_type.name)
    return {
        f"{hf_name}.int4": packed[order].contiguous(),
        f"{hf_name}.int4_sz": (scale_zero[:, order].contiguous()),
    }
