"""``BlockEngine``: runs one contiguous span of a model's blocks for many sessions.

It loads only its span's block files (each checked against the manifest's sha256), builds the
layers from the ``transformers`` classes of the architecture (quantized weights replace their
``nn.Linear`` / ``nn.Embedding`` with the modules of ``quant``; activations then run in bf16),
and keeps each session's keys and values in a ``SessionPagedKVCache``. Token ids go in when the
span starts with ``embed``; hidden states go in otherwise. Logits come out when it ends with
``head``; hidden states otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tiktrue.limits import KV_PAGE_TOKENS
from tiktrue.model.catalog import EMBED, HEAD, template_for
from tiktrue.model.errors import ShapeError, StoreError
from tiktrue.model.kv_cache import SessionPagedKVCache
from tiktrue.model.quant import dequantize_state, install_quantized
from tiktrue.model.store import BlockStore


@dataclass(frozen=True)
class Span:
    """Blocks ``first..last`` (inclusive) of ``model_chain_order``."""

    blocks: tuple[str, ...]

    @classmethod
    def of(cls, order: list[str], first: str, last: str) -> Span:
        try:
            i, j = order.index(first), order.index(last)
        except ValueError as exc:
            raise StoreError(f"span {first}..{last}: {exc}") from None
        if i > j:
            raise StoreError(f"span {first}..{last} runs backwards")
        return cls(tuple(order[i : j + 1]))

    @property
    def layer_ids(self) -> list[int]:
        return [int(b.split("_", 1)[1]) for b in self.blocks if b.startswith("layer_")]

    @property
    def has_embed(self) -> bool:
        return self.blocks[0] == EMBED

    @property
    def has_head(self) -> bool:
        return self.blocks[-1] == HEAD

    def __str__(self) -> str:
        return f"{self.blocks[0]}..{self.blocks[-1]}"


def split_evenly(order: list[str], parts: int) -> list[Span]:
    """``parts`` contiguous spans of nearly equal numbers of blocks (for demos and tests)."""
    if not 1 <= parts <= len(order):
        raise StoreError(f"cannot split {len(order)} blocks into {parts} spans")
    size, extra = divmod(len(order), parts)
    spans, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        spans.append(Span(tuple(order[at : at + n])))
        at += n
    return spans


class BlockEngine:
    """The compute of one worker's span."""

    def __init__(
        self,
        store: BlockStore,
        span: Span,
        *,
        kv_budget_bytes: int = 256 << 20,
        kv_page_size: int = KV_PAGE_TOKENS,
        spill_dir: Path | None = None,
        device: str | torch.device = "cpu",
        verify: bool = True,
    ) -> None:
        order = store.manifest.model_chain_order
        if Span.of(order, span.blocks[0], span.blocks[-1]) != span:
            raise StoreError(f"span {span} is not a contiguous part of {store.model_id}")
        self.store = store
        self.span = span
        self.device = torch.device(device)
        self.dtype = store.dtype
        config = store.config()
        config._attn_implementation = "sdpa"
        self.config = config
        self.template = template_for(config.model_type)
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size

        with torch.device("meta"):  # classes and shapes only; weights come from the blocks
            skeleton = AutoModelForCausalLM.from_config(config).to(self.dtype)
        self.embed: nn.Module | None = None
        self.norm: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        self.layers: list[nn.Module] = []
        for block in span.blocks:
            weights = store.load_block(block, verify=verify)
            if block == EMBED:
                self.embed = self._materialize(
                    skeleton.model.embed_tokens, weights, self.template.embed_prefix
                )
            elif block == HEAD:
                self.norm = self._materialize(skeleton.model.norm, weights, "model.norm.")
                self.lm_head = self._materialize(skeleton.lm_head, weights, "lm_head.")
            else:
                index = int(block.split("_", 1)[1])
                layer = skeleton.model.layers[index]
                self.layers.append(
                    self._materialize(layer, weights, self.template.layer_prefix(index))
                )
        # The rotary tables are computed, not stored: build them for real, off the meta device.
        self.rotary = type(skeleton.model.rotary_emb)(config=config).to(self.device)
        del skeleton
        self._windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]

        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.kv = SessionPagedKVCache(
            span.layer_ids,
            config.num_key_value_heads,
            head_dim,
            dtype=self.dtype,
            budget_bytes=kv_budget_bytes,
            page_size=kv_page_size,
            spill_dir=spill_dir,
            device=self.device,
        )

    def _materialize(self, module: nn.Module, weights: dict, prefix: str) -> nn.Module:
        state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if self.device.type == "cpu":  # torch's int8/int4 kernels used here are CPU ones
            module, state = install_quantized(module, state, self.dtype)
        else:
            state = dequantize_state(state)
        state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise StoreError(f"block weights under {prefix!r} do not fit the model: {exc}") from exc
        _rebuild_computed_buffers(module)
        return module.to(self.device).eval()

    @property
    def weight_bytes(self) -> int:
        return sum(self.store.manifest.blocks[b].bytes for b in self.span.blocks)

    # --- sessions ------------------------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        self.kv.open(session_id)

    def close_session(self, session_id: str) -> None:
        self.kv.close(session_id)

    def session_length(self, session_id: str) -> int:
        return self.kv.length(session_id)

    def truncate_session(self, session_id: str, length: int) -> None:
        self.kv.truncate(session_id, length)

    def save_session(self, session_id: str, path: Path) -> Path:
        return self.kv.save_to_disk(session_id, path)

    def load_session(self, session_id: str, path: Path) -> None:
        self.kv.load_from_disk(session_id, path)

    # --- compute -------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self, session_id: str, inputs: torch.Tensor, start: int, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run positions ``start..start+n-1`` of a session through the span.

        ``inputs``: token ids ``[n]`` or ``[1, n]`` when the span holds ``embed``, else hidden
        states ``[1, n, hidden]``. Returns hidden states ``[1, n, hidden]``, or logits
        ``[1, vocab]`` of the last position (``[1, n, vocab]`` with ``all_logits``) at the head.
        """
        hidden = self._check_inputs(inputs)
        count = hidden.shape[1]
        step = self.kv.begin(session_id, start, count)
        if self.layers:
            positions = torch.arange(start, start + count, device=self.device).unsqueeze(0)
            rope = self.rotary(hidden, positions)
            masks: dict[int | None, torch.Tensor | None] = {}
            for layer, window in zip(self.layers, self._windows, strict=True):
                if window not in masks:
                    masks[window] = _attention_mask(start, count, window, self.device)
                hidden = layer(
                    hidden,
                    attention_mask=masks[window],
                    position_embeddings=rope,
                    position_ids=positions,
                    past_key_values=step,
                )
        self.kv.commit(step)
        if self.lm_head is None:
            return hidden
        hidden = self.norm(hidden if all_logits else hidden[:, -1:])
        logits = self.lm_head(hidden).float()  # sampling wants fp32 whatever the weights are
        return logits if all_logits else logits[:, -1]

    def _check_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            if inputs.dtype not in (torch.int64, torch.int32) or inputs.dim() not in (1, 2):
                raise ShapeError(
                    f"span {self.span} starts with embed: it takes token ids [n] or [1, n], "
                    f"got {inputs.dtype} {tuple(inputs.shape)}"
                )
            ids = inputs.reshape(1, -1).to(self.device)
            if ids.shape[1] == 0:
                raise ShapeError("no token ids")
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ShapeError(f"token ids must lie in 0..{self.vocab_size - 1}")
            return self.embed(ids)
        if (
            not inputs.is_floating_point()
            or inputs.dim() != 3
            or inputs.shape[0] != 1
            or inputs.shape[2] != self.hidden_size
            or inputs.shape[1] == 0
        ):
            raise ShapeError(
                f"span {self.span} takes hidden states [1, n, {self.hidden_size}], "
                f"got {inputs.dtype} {tuple(inputs.shape)}"
            )
        return inputs.to(device=self.device, dtype=self.dtype)


def _attention_mask(start: int, count: int, window: int | None, device) -> torch.Tensor | None:
    """A boolean mask (True = attend) where sdpa's own causal flag would be wrong, else None."""
    total = start + count
    if (count == 1 or start == 0) and (window is None or total <= window):
        return None
    query = torch.arange(start, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return allowed.view(1, 1, count, total)


def _rebuild_computed_buffers(module: nn.Module) -> None:
    """Non-persistent buffers are not in the blocks; rebuild the ones we know how to compute."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if name == "embed_scale" and hasattr(module, "scalar_embed_scale"):  # Gemma's embedding
            module.embed_scale = torch.tensor(module.scalar_embed_scale)
        else:
            raise StoreError(
                f"{type(module).__name__} has a computed buffer {name!r} we cannot rebuild"
            )
