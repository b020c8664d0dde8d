"""Tiny models generated on the fly: random weights, a few layers, a real trained tokenizer.

Tests never download a model. Each factory writes a Hugging Face folder (config.json,
safetensors, tokenizer with a ChatML chat template), as a user's model folder would look.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "TikTrue runs one language model across the computers of a local network.",
    "Each worker holds a span of layers and passes hidden states to the next worker.",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789",
    "What is the capital of France? Paris is the capital of France.",
    "Privacy matters: no cloud, no internet, only the machines you own.",
]

ARCH_DEFAULTS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
}


def make_tokenizer(directory: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def make_tiny_model(
    directory: Path,
    architecture: str = "llama",
    *,
    num_layers: int = 6,
    hidden_size: int = 64,
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    max_position_embeddings: int = 512,
    **overrides,
) -> Path:
    """Write a random tiny ``architecture`` model with a tokenizer into ``directory``
    (``overrides``: config fields, e.g. ``sliding_window``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        # larger than usual: peaked distributions, so greedy choices are never near-ties
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**ARCH_DEFAULTS[architecture], **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def reference_model(store) -> torch.nn.Module:
    """The whole model in ``transformers`` with the weights of a block store."""
    config = store.config()
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(store.dtype)
    missing, unexpected = model.load_state_dict(store.load_full_state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing
    return model.eval()


def make_endless_model(directory: Path, *, context: int = 4096) -> Path:
    """A tiny Llama that never ends an answer by itself, for tests that stop an answer while
    it streams (however fast the machine runs it). Its LM head (not tied) has zero rows for the
    special tokens (end of turn, end of text), so their logit is exactly 0, while the largest
    of the other ~380 random logits is positive unless every one of them is negative (odds
    2**-380): greedy, an answer runs to its ``max_tokens``."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model(
        directory, "llama", tie_word_embeddings=False, max_position_embeddings=context
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    for token in SPECIAL:
        weights["lm_head.weight"][tokenizer.convert_tokens_to_ids(token)] = 0.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
