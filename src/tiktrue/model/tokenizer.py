"""Tokenizer, chat template and streaming detokenization for a block store."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tiktrue.model.errors import StoreError
from tiktrue.model.store import BlockStore


def load_tokenizer(store: BlockStore) -> PreTrainedTokenizerBase:
    if not store.manifest.has_tokenizer:
        raise StoreError(f"model {store.model_id!r} was imported without a tokenizer")
    return AutoTokenizer.from_pretrained(store.root)


def stop_token_ids(store: BlockStore, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids from the config and the tokenizer (chat models often have several)."""
    ids: set[int] = set()
    declared = getattr(store.config(), "eos_token_id", None)
    ids.update(declared if isinstance(declared, list) else [declared])
    ids.add(tokenizer.eos_token_id)
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.discard(None)
    return ids


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict] | str, *, raw: bool = False
) -> list[int]:
    """Token ids of a conversation through the chat template, or of raw text with ``raw``."""
    if raw or tokenizer.chat_template is None:
        text = messages if isinstance(messages, str) else "\n".join(m["content"] for m in messages)
        return list(tokenizer.encode(text))
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Each step decodes only a short window (the tokens since the last emitted text plus the one
    before, for spacing), not the whole answer: the per-token cost stays flat (the method of
    Hugging Face TGI and vLLM).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, as it decodes now (the answer has ended)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or an incomplete multi-byte character
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
