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

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tiktrue.limits import KV_PAGE_TOKENS
from tiktrue.model.attention import pool_view, warm_up
from tiktrue.model.catalog import EMBED, HEAD, template_for
from tiktrue.model.errors import CacheBudgetExceeded, ModelError, ShapeError, StoreError
from tiktrue.model.kv_cache import RowPlan, SessionPagedKVCache, SessionStep
from tiktrue.model.lean_layers import RotaryTable, check_layers, run_layer
from tiktrue.model.quant import dequantize_state, fix_float_linears, install_quantized
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
        self.rotary = RotaryTable(type(skeleton.model.rotary_emb)(config=config), self.device)
        del skeleton
        check_layers(self.layers)
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
        self._pool = pool_view(self.kv.pool)  # the same memory, as the attention kernel reads it
        warm_up(self._pool, kv_heads=self.kv.num_kv_heads, pages=self.kv.num_pages)

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
        return fix_float_linears(module).to(self.device).eval()

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
        Every position's result is the same bits however the session's positions were split
        into calls and whatever ``forward_batch`` ran them beside.
        """
        hidden = self._check_inputs(inputs)
        plan = self.kv.plan([self.kv.begin(session_id, start, hidden.shape[1])])
        hidden = self._run(hidden[0], plan)
        self.kv.commit(plan)
        if self.lm_head is None:
            return hidden[None]
        if all_logits:
            return self._logits(hidden)[None]
        return self._logits(hidden[-1:])

    @torch.inference_mode()
    def forward_batch(
        self, steps: list[tuple[str, torch.Tensor, int]]
    ) -> list[torch.Tensor | ModelError]:
        """Steps of several sessions as one forward (continuous batching).

        ``steps``: ``(session_id, inputs, start)`` with inputs as for ``forward``: one new
        position (a decode step) or several (a prefill chunk), mixed freely. Returns per step
        what ``forward`` returns for it (hidden states ``[1, n, hidden]``, or logits
        ``[1, vocab]`` of its last position), the same bits, or the ``ModelError`` that step
        met; the other steps run regardless. A second step of one session runs after the
        batch, as do steps whose pages do not fit beside the batch's.
        """
        results: list[torch.Tensor | ModelError | None] = [None] * len(steps)
        batch: list[tuple[int, SessionStep, torch.Tensor]] = []
        alone: list[int] = []  # run after the batch, one by one
        members: set[str] = set()
        for i, (session_id, inputs, start) in enumerate(steps):
            if session_id in members:  # a second step of one session waits for the first
                alone.append(i)
                continue
            try:
                hidden = self._check_inputs(inputs)
                step = self.kv.begin(session_id, start, hidden.shape[1], pinned=frozenset(members))
            except CacheBudgetExceeded as exc:
                if members:  # maybe only while the batch holds its pages: try it alone after
                    alone.append(i)
                else:
                    results[i] = exc
                continue
            except ModelError as exc:
                results[i] = exc
                continue
            members.add(session_id)
            batch.append((i, step, hidden[0]))
        if batch:
            plan = self.kv.plan([step for _, step, _ in batch])
            hidden = self._run(torch.cat([h for _, _, h in batch]), plan)
            self.kv.commit(plan)
            ends = np.cumsum([step.count for _, step, _ in batch])
            if self.lm_head is not None:
                logits = self._logits(hidden[torch.from_numpy(ends - 1)])
                for row, (i, _, _) in enumerate(batch):
                    results[i] = logits[row : row + 1]
            else:
                for (i, step, _), end in zip(batch, ends, strict=True):
                    results[i] = hidden[end - step.count : end][None]
        for i in alone:
            try:
                results[i] = self.forward(*steps[i])
            except ModelError as exc:
                results[i] = exc
        return results

    def _run(self, hidden: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        """The span's decoder layers over the step's rows ``[rows, hidden]``."""
        if not self.layers:
            return hidden
        rotary = self.rotary(torch.from_numpy(plan.lengths - 1).to(self.device))
        for local, (layer, window) in enumerate(zip(self.layers, self._windows, strict=True)):
            hidden = run_layer(layer, hidden, rotary, self.kv, self._pool, local, plan, window)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()  # sampling wants fp32 whatever the weights

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
