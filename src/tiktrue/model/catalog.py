"""Architectures TikTrue can split into blocks.

Each template reuses the ``transformers`` model classes and weight names; it only records what
differs between families at the block boundaries (which weight names fall into which block).
The embedding, decoder layer, norm, rotary and head modules are those of the ``transformers``
model itself (Gemma's embedding scaling, Qwen3's q/k norms and so on come with them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tiktrue.model.errors import UnsupportedArchitecture

EMBED = "embed"
HEAD = "head"


def layer_block(index: int) -> str:
    return f"layer_{index}"


@dataclass(frozen=True)
class ArchitectureTemplate:
    """How one family's weights fall into blocks."""

    model_type: str
    embed_prefix: str = "model.embed_tokens."
    layer_pattern: str = r"^model\.layers\.(\d+)\."
    norm_prefix: str = "model.norm."
    lm_head_prefix: str = "lm_head."

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def block_of(self, weight_name: str) -> str | None:
        """The block a weight belongs to; ``None`` for buffers that are rebuilt, not stored."""
        if weight_name.endswith("rotary_emb.inv_freq"):
            return None
        if weight_name.startswith(self.embed_prefix):
            return EMBED
        match = re.match(self.layer_pattern, weight_name)
        if match:
            return layer_block(int(match.group(1)))
        if weight_name.startswith((self.norm_prefix, self.lm_head_prefix)):
            return HEAD
        raise UnsupportedArchitecture(
            f"weight {weight_name!r} does not belong to any block of a {self.model_type} model"
        )


CATALOG: dict[str, ArchitectureTemplate] = {
    t.model_type: t
    for t in (
        ArchitectureTemplate("llama"),
        ArchitectureTemplate("mistral"),
        ArchitectureTemplate("qwen2"),
        ArchitectureTemplate("qwen3"),
        ArchitectureTemplate("gemma"),
    )
}


def template_for(model_type: str) -> ArchitectureTemplate:
    try:
        return CATALOG[model_type]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not in the catalog (supported: {known})"
        ) from None


def chain_order(num_layers: int) -> list[str]:
    """``model_chain_order``: embed, every layer in order, head."""
    return [EMBED, *(layer_block(i) for i in range(num_layers)), HEAD]
