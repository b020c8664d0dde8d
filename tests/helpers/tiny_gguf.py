"""Write a tiny Hugging Face Llama folder as a GGUF file, the way llama.cpp's converter would.

Tests never download a GGUF: they make one from a ``make_tiny_model`` folder. The layout follows
``convert_hf_to_gguf.py``: llama.* hyperparameters, a ``gpt2`` (byte-level BPE) tokenizer with its
merges and chat template, tensors under GGUF names, and attn_q / attn_k rows permuted the way
llama.cpp permutes them (``LlamaModel.permute``); transformers undoes that permutation on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer


def permute_like_llama_cpp(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """``convert_hf_to_gguf.py`` ``LlamaModel.permute``: HF rotary halves -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _write_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    assert None not in tokens, "the vocabulary has holes"
    special = set(tokenizer.all_special_tokens)
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    merges = json.loads((folder / "tokenizer.json").read_text("utf-8"))["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([control if t in special else normal for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)


def write_llama_gguf(
    folder: Path,
    path: Path,
    *,
    half: bool = False,
    architecture: str = "llama",
    name: str = "tiny-llama",
    reverse: bool = False,
    quant: str | None = None,
    sampling: dict | None = None,
) -> Path:
    """Write the Llama model in HF ``folder`` as the GGUF file ``path`` (F32, or F16 if ``half``,
    or ``quant`` = ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``, quantized by gguf-py's own code).

    As llama.cpp does for F16 and the quantized types, 1-D tensors (the norms) stay F32.
    ``architecture`` only changes the ``general.architecture`` string and the key prefix (to
    make files the importer must refuse);
    ``reverse`` writes the tensors last block first (the head before the embedding);
    ``sampling``: recommended settings as ``general.sampling.*`` metadata (``{"temp": 0.4}``,
    gguf-py's ``add_sampling_<name>``).
    """
    folder, path = Path(folder), Path(path)
    config = AutoConfig.from_pretrained(folder)
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(name)
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)
    qtype = gguf.GGMLQuantizationType[quant] if quant else None
    if quant:
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant}"])
    else:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    _write_tokenizer(writer, folder)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    items = list(hf_state_dict(folder).items())
    for hf_name, tensor in reversed(items) if reverse else items:
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, f"no GGUF name for {hf_name}"
        data = tensor.to(torch.float32).numpy()
        if gguf_name.endswith(".attn_q"):
            data = permute_like_llama_cpp(data, n_head, n_head)
        elif gguf_name.endswith(".attn_k"):
            data = permute_like_llama_cpp(data, n_head, n_head_kv)
        if qtype is not None and data.ndim > 1:
            packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
            writer.add_tensor(f"{gguf_name}.{suffix}", packed, raw_dtype=qtype)
            continue
        if half and data.ndim > 1:
            data = data.astype(np.float16)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
