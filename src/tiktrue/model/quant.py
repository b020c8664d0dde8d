"""Quantized weights: how they are stored in a block, made at import, and run by the engine.

CPU decode reads every weight once per token, so bytes per weight set the speed and decide
whether a model fits at all. Two formats, each one that torch has a vector kernel for on CPU
(both kernels want bf16 activations: with fp32 ones they fall back to scalar code):

``int8``  per output channel, symmetric: ``<name>.int8`` int8 ``[out, in]`` and
          ``<name>.int8_scale`` bf16 ``[out]``; runs with ``aten._weight_int8pack_mm``.
``int4``  per group of ``in`` (32 by default), asymmetric: ``<name>.int4`` uint8 ``[out, in/2]``
          (element ``2j`` in the low nibble, ``2j+1`` in the high one) and ``<name>.int4_sz`` bf16
          ``[in/group, out, 2]`` (scale, zero), with ``w = (q - 8) * scale + zero``. This holds a
          GGUF Q4_0 (zero = 0) or Q4_1 (zero = min + 8 * scale) block exactly. torch's own packed
          layout depends on the CPU's vector width, so the store keeps this portable one and
          ``aten._convert_weight_to_int4pack_for_cpu`` packs it at load.

Every other tensor (norms, biases, weights kept in float) is stored under its own name.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tiktrue.model.errors import StoreError

INT4_GROUP = 32
INT8, INT4 = "int8", "int4"
FLOAT_FORMATS = ("fp32", "fp16", "bf16")
WEIGHT_FORMATS = (*FLOAT_FORMATS, INT8, INT4)
_SUFFIXES = {INT8: (".int8", ".int8_scale"), INT4: (".int4", ".int4_sz")}
SCALE_DTYPE = torch.bfloat16  # what the kernels take; the store keeps it so nothing converts


def quantized_format(key: str) -> tuple[str, str] | None:
    """``(weight name, format)`` for the main tensor of a quantized weight, else ``None``."""
    for fmt, (main, _) in _SUFFIXES.items():
        if key.endswith(main):
            return key[: -len(main)], fmt
    return None


def is_quant_part(key: str) -> bool:
    return any(key.endswith(suffix) for pair in _SUFFIXES.values() for suffix in pair)


def formats_of(tensors: dict[str, torch.Tensor]) -> str:
    """A block's weight formats, e.g. ``"int4"`` or ``"int4+int8"`` (float tensors of matrices
    count by their dtype; 1-D float tensors, the norms and biases, do not count)."""
    found = set()
    for key, tensor in tensors.items():
        quant = quantized_format(key)
        if quant:
            found.add(quant[1])
        elif not is_quant_part(key) and tensor.dim() > 1:
            found.add(_float_name(tensor.dtype))
    return "+".join(sorted(found)) or "fp32"


def _float_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# --- making quantized tensors -----------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q [out, in], scale [out])``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4(
    weight: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` inputs (min..max over 16 levels):
    ``(packed [out, in/2] uint8, scale_zero [in/group, out, 2])``."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group, group)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15).clamp_min(1e-12).to(SCALE_DTYPE).float()
    # zero is the value at q = 8, rounded to bf16: recompute q against the rounded zero
    zero = (low + 8 * scale).to(SCALE_DTYPE).float()
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    packed = pack_nibbles(q.reshape(out_features, in_features).to(torch.uint8))
    scale_zero = torch.stack([scale.T, zero.T], dim=-1).to(SCALE_DTYPE)
    return packed, scale_zero.contiguous()


def quantize(name: str, weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """``weight`` in format ``fmt`` as the tensors a block stores under ``name``."""
    if fmt in FLOAT_FORMATS:
        return {name: weight.to(parse_float(fmt)).contiguous()}
    if weight.dim() != 2:
        raise StoreError(f"{name}: only matrices are quantized, not shape {tuple(weight.shape)}")
    if fmt == INT4 and weight.shape[1] % INT4_GROUP == 0:
        packed, scale_zero = quantize_int4(weight)
        return {f"{name}.int4": packed, f"{name}.int4_sz": scale_zero}
    if fmt in (INT4, INT8):  # int4 needs whole groups: an odd width falls back to int8
        q, scale = quantize_int8(weight)
        return {f"{name}.int8": q, f"{name}.int8_scale": scale}
    raise StoreError(f"unknown weight format {fmt!r} (use one of {', '.join(WEIGHT_FORMATS)})")


def parse_float(fmt: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[rows, in]`` values 0..15 -> ``[rows, in/2]`` uint8 (numpy: many times faster than
    torch's threaded uint8 ops on a busy machine, and these run once per weight at import/load)."""
    x = q.numpy().astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(x[:, 0::2] | (x[:, 1::2] << 4)))


def unpack_nibbles(packed: torch.Tensor, dtype=np.uint8) -> torch.Tensor:
    """``[rows, in/2]`` uint8 -> ``[rows, in]`` values 0..15."""
    x = packed.numpy()
    out = np.empty((x.shape[0], x.shape[1] * 2), dtype=dtype)
    out[:, 0::2] = x & 15
    out[:, 1::2] = x >> 4
    return torch.from_numpy(out)


# --- GGUF blocks, kept as they are ------------------------------------------------------------

GGUF_Q4_0, GGUF_Q4_1, GGUF_Q8_0 = "Q4_0", "Q4_1", "Q8_0"


def gguf_q4_to_int4(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_0 / Q4_1 tensor (``[rows, bytes]`` uint8 as gguf-py reads it) as ``int4``
    tensors, without loss (only the fp16 scales are rounded to bf16)."""
    head = 2 if kind == GGUF_Q4_0 else 4
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, head + 16)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]  # [rows, nb]
    if kind == GGUF_Q4_0:
        zero = np.zeros_like(d)
    else:
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
        zero = m + 8 * d
    qs = blocks[..., head:]  # byte j: element j (low nibble) and element j + 16 (high nibble)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)
    packed = pack_nibbles(torch.from_numpy(q.astype(np.uint8)))
    scale_zero = torch.from_numpy(np.stack([d.T, zero.T], axis=-1)).to(SCALE_DTYPE)
    return packed, scale_zero.contiguous()


# --- the modules the engine runs ----------------------------------------------------------------


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(packed).float()  # [out, in]
    group = q.shape[1] // scale_zero.shape[0]
    scale = scale_zero[..., 0].float().T.repeat_interleave(group, dim=1)
    zero = scale_zero[..., 1].float().T.repeat_interleave(group, dim=1)
    return (q - 8) * scale + zero


def dequantize_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's tensors with every quantized weight turned back into fp32 (reference path)."""
    out = {k: v for k, v in tensors.items() if not is_quant_part(k)}
    for key in tensors:
        quant = quantized_format(key)
        if quant is None:
            continue
        name, fmt = quant
        if fmt == INT8:
            out[name] = tensors[key].float() * tensors[f"{name}.int8_scale"].float()[:, None]
        else:
            out[name] = dequantize_int4(tensors[key], tensors[f"{name}.int4_sz"])
    return out


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels' vector loads crash on tensors off a 64-byte boundary (safetensors hands
    out such tensors); torch's own allocator aligns to 64."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


class QuantLinear(nn.Module):
    """``nn.Linear`` over int8 or int4 weights with torch's CPU kernels (bf16 activations)."""

    def __init__(self, fmt: str, parts: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.format = fmt
        if fmt == INT8:
            weight, scale = parts[".int8"], parts[".int8_scale"]
            self.out_features, self.in_features = weight.shape
            self.register_buffer("weight_q", _aligned(weight), persistent=False)
            self.register_buffer("scale", _aligned(scale.to(SCALE_DTYPE)), persistent=False)
        else:
            packed, scale_zero = parts[".int4"], parts[".int4_sz"]
            self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
            self.group = self.in_features // scale_zero.shape[0]
            # the kernel wants out % 16 == 0: pad with zero rows, cut the output back
            pad = -self.out_features % 16
            q = unpack_nibbles(packed, np.int32)
            if pad:
                q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=torch.int32)])
                padding = scale_zero.new_zeros(len(scale_zero), pad, 2)
                scale_zero = torch.cat([scale_zero, padding], dim=1)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.register_buffer("weight_q", packed, persistent=False)
            scale_zero = _aligned(scale_zero.to(SCALE_DTYPE).contiguous())
            self.register_buffer("scale_zero", scale_zero, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.dtype != SCALE_DTYPE:
            flat = flat.to(SCALE_DTYPE)
        if self.format == INT8:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_q, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.weight_q, self.group, self.scale_zero
            )
            if out.shape[1] != self.out_features:
                out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}"


class QuantEmbedding(nn.Module):
    """Token embedding over int8 / int4 rows: only the looked-up rows are dequantized."""

    def __init__(
        self, fmt: str, parts: dict[str, torch.Tensor], dtype: torch.dtype, multiplier=None
    ):
        super().__init__()
        self.format, self.dtype = fmt, dtype
        self.multiplier = multiplier  # Gemma scales its embeddings by sqrt(hidden)
        main = parts[f".{fmt}"]
        side = parts[".int8_scale"] if fmt == INT8 else parts[".int4_sz"]
        self.register_buffer("weight_q", main, persistent=False)
        self.register_buffer("side", side, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.format == INT8:
            rows = self.weight_q[flat].float() * self.side[flat].float()[:, None]
        else:
            rows = dequantize_int4(self.weight_q[flat], self.side[:, flat])
        if self.multiplier is not None:
            rows = rows * torch.tensor(self.multiplier, dtype=self.dtype).float()
        return rows.to(self.dtype).reshape(*ids.shape, -1)


# Linear layers that read the same input: with quantized weights each is one kernel call of
# mostly fixed cost at decode, so each group runs as one call over its stacked weights
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedProjection(nn.Module):
    """One ``QuantLinear`` whose output several ``ProjectionSlice`` modules share: the first
    slice called with an input computes it, the others of the same input take their columns."""

    def __init__(self, linear: QuantLinear, users: int) -> None:
        super().__init__()
        self.linear = linear
        self.users = users
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._left = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or self._left == 0:
            self._input, self._output, self._left = x, self.linear(x), self.users
        output = self._output
        self._left -= 1
        if self._left == 0:  # every user has its columns: hold no tensor until the next input
            self._input = self._output = None
        return output


class ProjectionSlice(nn.Module):
    """Stands where a fused ``nn.Linear`` stood: its columns of the shared output."""

    def __init__(self, shared: SharedProjection, start: int, stop: int) -> None:
        super().__init__()
        self.shared = shared
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}..{self.stop} of {self.shared.linear.extra_repr()}"


def _stack_parts(fmt: str, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The store tensors of several weights of one format as one weight (outputs stacked)."""
    main, side = _SUFFIXES[fmt]
    side_dim = 0 if fmt == INT8 else 1  # int4 scale_zero is [groups, out, 2]
    return {
        main: torch.cat([p[main] for p in parts]),
        side: torch.cat([p[side] for p in parts], dim=side_dim),
    }


def _fusable(names: list[str], quantized: dict) -> bool:
    """Whether the linears ``names`` hold weights of one format, one input width
    (and, for int4, one group size), so their stacked weights are one valid weight."""
    found = [quantized.get(name) for name in names]
    if any(f is None for f in found) or len({fmt for fmt, _ in found}) != 1:
        return False
    fmt = found[0][0]
    main, side = _SUFFIXES[fmt]
    widths = {parts[main].shape[1] for _, parts in found}
    groups = {parts[side].shape[0] for _, parts in found} if fmt == INT4 else {0}
    return len(widths) == 1 and len(groups) == 1


def install_quantized(
    module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Replace each ``nn.Linear`` / ``nn.Embedding`` of ``module`` whose weight ``state`` holds
    quantized with its quantized module; return the module and the rest of ``state`` (floats).

    The linears of a ``FUSED_GROUPS`` group (same parent, same format) become one kernel call:
    a ``SharedProjection`` with a ``ProjectionSlice`` in place of each."""
    rest = dict(state)
    quantized: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # owner -> (format, parts)
    for key in list(state):
        quant = quantized_format(key)
        if quant is None:
            continue
        name, fmt = quant
        owner = name.removesuffix("weight").rstrip(".")
        quantized[owner] = (fmt, {s: rest.pop(name + s) for s in _SUFFIXES[fmt]})
    for group in FUSED_GROUPS:
        parents = {o.rpartition(".")[0] for o in quantized if o.rpartition(".")[2] == group[0]}
        for parent in parents:
            owners = [f"{parent}.{child}" if parent else child for child in group]
            if not _fusable(owners, quantized):
                continue
            fmt = quantized[owners[0]][0]
            parts = [quantized.pop(o)[1] for o in owners]
            biases = [rest.pop(f"{o}.bias", None) for o in owners]
            if any(b is None for b in biases) and any(b is not None for b in biases):
                raise StoreError(f"{parent}: {', '.join(group)} have biases on some only")
            bias = None if biases[0] is None else torch.cat(biases).to(dtype)
            shared = SharedProjection(QuantLinear(fmt, _stack_parts(fmt, parts), bias), len(group))
            at = 0
            for owner, part in zip(owners, parts, strict=True):
                width = part[_SUFFIXES[fmt][0]].shape[0]
                _replace(module, owner, ProjectionSlice(shared, at, at + width))
                at += width
    for owner, (fmt, parts) in quantized.items():
        original = module.get_submodule(owner)
        if isinstance(original, nn.Embedding):
            multiplier = getattr(original, "scalar_embed_scale", None)
            replacement: nn.Module = QuantEmbedding(fmt, parts, dtype, multiplier)
        elif isinstance(original, nn.Linear):
            bias = rest.pop(f"{owner}.bias" if owner else "bias", None)
            replacement = QuantLinear(fmt, parts, None if bias is None else bias.to(dtype))
        else:
            raise StoreError(f"{owner}: a quantized weight on a {type(original).__name__}")
        if not owner:
            return replacement, rest
        _replace(module, owner, replacement)
    return module, rest


def _replace(module: nn.Module, owner: str, replacement: nn.Module) -> None:
    parent, _, child = owner.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, replacement)


# --- float weights, row for row ---------------------------------------------------------------

FIXED_ROWS = 8  # rows of every float matmul call (measured: see FixedRowsLinear)


class FixedRowsLinear(nn.Module):
    """An ``nn.Linear`` (float weights) whose every call multiplies exactly ``FIXED_ROWS``
    rows, the last call padded with zeros.

    oneDNN/MKL choose their kernel and the association of each output's sum by the shape of
    the call: a row's result changed with how many rows shared it (fp32: from 2 rows on; bf16:
    from 64). With one shape for every call, a row comes out the same bits whatever its
    neighbours (checked for each row position of the block, with zero and random neighbours,
    AVX-512 and AVX2 kernels, 1 and 2 threads). The int4/int8 kernels of ``QuantLinear`` need
    no such care: they give each row the same bits for any number of rows.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        padded = -(-rows // FIXED_ROWS) * FIXED_ROWS
        if padded != rows:
            flat = torch.cat([flat, flat.new_zeros(padded - rows, shape[-1])])
        out = torch.cat(
            [self.linear(flat[i : i + FIXED_ROWS]) for i in range(0, padded, FIXED_ROWS)]
        )
        return out[:rows].reshape(*shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"calls of {FIXED_ROWS} rows"


def fix_float_linears(module: nn.Module) -> nn.Module:
    """``module`` with each of its ``nn.Linear`` (float weights) inside a ``FixedRowsLinear``."""
    if isinstance(module, nn.Linear):
        return FixedRowsLinear(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear):
            _replace(module, name, FixedRowsLinear(child))
    return module
