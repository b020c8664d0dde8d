"""A tiny model that has learned something, and text to measure it on.

Perplexity says nothing about a model with random weights: its predictions are near-uniform
(or, with large weights, confidently wrong), so quantizing it changes perplexity by chance.
Here a tiny Llama learns a small made-up language in a few seconds of CPU: words from the
tokenizer's corpus, chained by a fixed sparse Markov chain (each word has three successors, with
probabilities 0.7 / 0.2 / 0.1). The trained model's perplexity on fresh text of that language is
far below the vocabulary size, so broken weights show up as a large rise.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers.tiny_models import CORPUS, make_tokenizer

SUCCESSOR_WEIGHTS = (0.7, 0.2, 0.1)


def _language(seed: int = 7) -> tuple[list[str], dict[str, list[str]]]:
    words = sorted({w.strip(".,!?:") for line in CORPUS for w in line.split()} - {""})
    rng = random.Random(seed)
    return words, {w: rng.sample(words, len(SUCCESSOR_WEIGHTS)) for w in words}


def made_up_text(words_count: int, seed: int) -> str:
    """``words_count`` words of the made-up language, from the random state ``seed``."""
    words, successors = _language()
    rng = random.Random(seed)
    word, out = rng.choice(words), []
    for _ in range(words_count):
        out.append(word)
        word = rng.choices(successors[word], SUCCESSOR_WEIGHTS)[0]
    return " ".join(out)


def make_trained_model(
    directory: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    steps: int = 300,
    seq_len: int = 128,
    batch: int = 16,
    seed: int = 0,
) -> Path:
    """Train a tiny Llama on the made-up language; write it as a Hugging Face folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor(tokenizer(made_up_text(20_000, seed=seed + 1))["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
            chunk = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
            loss = model(chunk, labels=chunk).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(directory)
    return directory
