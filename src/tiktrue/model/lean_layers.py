"""The decoder layers of every catalog architecture, run over rows with the same result for a
row whatever else the step holds (DESIGN.md §3, batch invariance).

A step's hidden states are ``[rows, hidden]``: a prefill chunk is many rows of one session, a
decode batch one row of each of several sessions, and both at once is just more rows. Every op
of a layer computes each row alone: the norms, the activations and the residual additions are
row-wise (checked bit for bit for 1..300 rows, AVX-512 and AVX2 kernels, 1 and 2 threads); the
int4/int8 kernels of ``quant.QuantLinear`` give each row the same bits whatever the number of
rows; float weights run in calls of a fixed number of rows (``quant.FixedRowsLinear``); the
rotary angles come from a table filled in fixed blocks (``RotaryTable``); attention reads each
row's own keys in a fixed order (``attention``). So a session's logits are the same alone, in
any batch, and after its cache was rebuilt by a prefill of any chunking.

The modules are those of ``transformers`` (norms, projections, MLP), called in the order of
``LlamaDecoderLayer.forward``, which Mistral, Qwen2, Qwen3 (q/k norms) and Gemma share.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tiktrue.model.attention import attend
from tiktrue.model.errors import UnsupportedArchitecture
from tiktrue.model.kv_cache import RowPlan, SessionPagedKVCache

LEAN_LAYERS = {
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "GemmaDecoderLayer",
}
ROTARY_BLOCK = 256  # positions whose angles one call computes (always this many)


def check_layers(layers: list[nn.Module]) -> None:
    for layer in layers:
        if type(layer).__name__ not in LEAN_LAYERS:
            raise UnsupportedArchitecture(
                f"{type(layer).__name__} is not a decoder layer the engine runs "
                f"(known: {', '.join(sorted(LEAN_LAYERS))})"
            )


class RotaryTable:
    """cos and sin (float32, ``[positions, head_dim]``) of the model's rotary embedding, by
    position. Filled ``ROTARY_BLOCK`` positions per call, so a position's angles are the same
    bits whichever step first needed them (torch's vectorized cos/sin and their scalar tail
    can differ in the last bit)."""

    def __init__(self, rotary: nn.Module, device: torch.device) -> None:
        self.rotary = rotary
        self.device = device
        self.cos = torch.empty(0, device=device)
        self.sin = torch.empty(0, device=device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1
        if needed > len(self.cos):
            self._grow(needed)
        return self.cos[positions], self.sin[positions]

    def _grow(self, needed: int) -> None:
        cos, sin = [self.cos], [self.sin]
        probe = torch.empty(0, dtype=torch.float32, device=self.device)
        for first in range(len(self.cos), needed, ROTARY_BLOCK):
            positions = torch.arange(first, first + ROTARY_BLOCK, device=self.device)
            c, s = self.rotary(probe, positions[None])
            cos.append(c[0].float())
            sin.append(s[0].float())
        self.cos, self.sin = torch.cat(cos), torch.cat(sin)


def run_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    cache: SessionPagedKVCache,
    pool: np.ndarray,
    local: int,
    plan: RowPlan,
    window: int | None,
) -> torch.Tensor:
    """One decoder layer over ``hidden`` ``[rows, hidden]``; ``local``: the layer's index in
    ``cache``; ``pool``: the cache's pool as the attention kernel reads it."""
    attn = layer.self_attn
    rows = hidden.shape[0]
    residual = hidden
    x = layer.input_layernorm(hidden)
    shape = (rows, -1, attn.head_dim)
    query = attn.q_proj(x).view(shape)
    key = attn.k_proj(x).view(shape)
    value = attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3
        query, key = attn.q_norm(query), attn.k_norm(key)
    cos, sin = rotary
    query, key = _rotate(query.float(), cos, sin), _rotate(key.float(), cos, sin)
    cache.write(local, plan, key, value)
    out = attend(
        query,
        pool,
        kv_heads=cache.num_kv_heads,
        pages=cache.num_pages,
        layer=local,
        plan=plan,
        window=window,
        scale=attn.scaling,
    )
    hidden = residual + attn.o_proj(out.view(rows, -1).to(hidden.dtype))
    residual = hidden
    x = layer.post_attention_layernorm(hidden)
    mlp = layer.mlp
    return residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``transformers``' ``apply_rotary_pos_emb`` for ``[rows, heads, dim]`` (in float32)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
