"""Ways to run a quantized span on this CPU, measured on the same decode step (issue 11 item 2).

    python bench/quant_paths.py [--threads 2] [--big-layers 2] [--repeats 5] [--no-compile]
                                [--no-openvino] [--no-record]

One decode step (batch 1 and batch 8, a 128-token KV cache per sequence) through a span of
Llama decoder layers, run each way on the same weights:

- torch fp32 eager: the reference path (plain ``nn.Linear``);
- torch int8 / int4 eager: ``tiktrue.model.quant.QuantLinear`` (torch's CPU kernels, bf16
  activations), what the block engine runs;
- the same through ``torch.compile`` (needs a C++ compiler; its compile time is the start-up);
- OpenVINO fp32 and int8 (weights as int8 constants with their scales: OpenVINO keeps them
  compressed) with the KV cache as graph inputs, where ``openvino`` is installed.

Spans: SmolLM2-135M's 30 layers (its weights, from the demo model) and a few random layers of
Llama-3-8B's shapes. The layer is written out here (RMSNorm, rotary, grouped-query attention,
SwiGLU) so every runtime runs the same graph. Speed-ups are ratios against torch fp32 eager
measured in the same run. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from report import append
from tiktrue.model.quant import QuantLinear, quantize

PAST = 128


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SMOLLM2 = Shape("SmolLM2-135M (30 layers)", 30, 576, 1536, 9, 3)


def llama3_8b(layers: int) -> Shape:
    return Shape(f"Llama-3-8B-shaped, {layers} random layers", layers, 4096, 14336, 32, 8)


class DequantLinear(nn.Module):
    """int8 weights written as ``int8 constant -> convert -> multiply``: the pattern OpenVINO
    recognises as a compressed weight (it then never stores the float matrix)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        parts = quantize("w", weight, "int8")
        self.register_buffer("q", parts["w.int8"])
        self.register_buffer("scale", parts["w.int8_scale"].float()[:, None])

    def forward(self, x):
        return F.linear(x, self.q.float() * self.scale)


class Layer(nn.Module):
    """One Llama decoder layer, decode step with the past keys and values as inputs."""

    NAMES = ("q", "k", "v", "o", "gate", "up", "down")

    def __init__(self, shape: Shape, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.shape = shape
        for name in self.NAMES:
            linear = nn.Linear(weights[name].shape[1], weights[name].shape[0], bias=False)
            linear.weight = nn.Parameter(weights[name], requires_grad=False)
            setattr(self, name, linear)
        self.norm1 = nn.Parameter(weights["norm1"], requires_grad=False)
        self.norm2 = nn.Parameter(weights["norm2"], requires_grad=False)

    @staticmethod
    def rms(x, weight):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * weight

    @staticmethod
    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, x, cos, sin, past_k, past_v):
        s = self.shape
        batch = x.shape[0]
        h = self.rms(x, self.norm1)
        q = self.q(h).view(batch, 1, s.heads, s.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, 1, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, 1, s.kv_heads, s.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        groups = s.heads // s.kv_heads
        attn = F.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        )
        x = x + self.o(attn.transpose(1, 2).reshape(batch, 1, s.hidden))
        h = self.rms(x, self.norm2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), k, v


class Span(nn.Module):
    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, cos, sin, *past):
        out = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past[2 * i], past[2 * i + 1])
            out += [k, v]
        return (x, *out)


def smollm2_weights() -> list[dict[str, torch.Tensor]]:
    from tiktrue.model.demo_model import ensure_demo_model

    state = ensure_demo_model().load_full_state_dict()
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    layers = []
    for i in range(SMOLLM2.layers):
        p = f"model.layers.{i}."
        w = {short: state[f"{p}{long}.weight"] for short, long in names.items()}
        w["norm1"] = state[f"{p}input_layernorm.weight"]
        w["norm2"] = state[f"{p}post_attention_layernorm.weight"]
        layers.append(w)
    return layers


def random_weights(shape: Shape) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    kv = shape.kv_heads * shape.head_dim
    sizes = {
        "q": (shape.hidden, shape.hidden),
        "k": (kv, shape.hidden),
        "v": (kv, shape.hidden),
        "o": (shape.hidden, shape.hidden),
        "gate": (shape.intermediate, shape.hidden),
        "up": (shape.intermediate, shape.hidden),
        "down": (shape.hidden, shape.intermediate),
    }
    return [
        {
            **{n: torch.randn(s, generator=g) * 0.02 for n, s in sizes.items()},
            "norm1": torch.ones(shape.hidden),
            "norm2": torch.ones(shape.hidden),
        }
        for _ in range(shape.layers)
    ]


def quantized_span(span: Span, fmt: str) -> Span:
    """A copy of ``span`` with every linear as the engine's ``QuantLinear``, norms in bf16."""
    out = copy.deepcopy(span)
    for layer in out.layers:
        for name in Layer.NAMES:
            parts = quantize("w", getattr(layer, name).weight.data, fmt)
            setattr(layer, name, QuantLinear(fmt, {k[1:]: v for k, v in parts.items()}, None))
        layer.norm1.data = layer.norm1.data.bfloat16()
        layer.norm2.data = layer.norm2.data.bfloat16()
    return out


def dequant_span(span: Span) -> Span:
    out = copy.deepcopy(span)
    for layer in out.layers:
        for name in Layer.NAMES:
            setattr(layer, name, DequantLinear(getattr(layer, name).weight.data))
    return out


def inputs(shape: Shape, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, shape.hidden, generator=g).to(dtype)
    angle = torch.rand(1, 1, 1, shape.head_dim, generator=g)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    past = []
    for _ in range(shape.layers * 2):
        past.append(torch.randn(batch, shape.kv_heads, PAST, shape.head_dim, generator=g).to(dtype))
    return (x, cos, sin, *past)


def weight_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def time_steps(run, args_, repeats: int) -> float:
    """The fastest of ``repeats`` steps, after one warm-up: on a shared machine the minimum is
    the best estimate of a step's own cost (other processes only ever add time)."""
    run(*args_)
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        run(*args_)
        samples.append(time.perf_counter() - began)
    return min(samples)


def openvino_runner(span: nn.Module, example: tuple[torch.Tensor, ...]):
    import openvino as ov

    model = ov.convert_model(span, example_input=example)
    compiled = ov.Core().compile_model(model, "CPU")
    request = compiled.create_infer_request()

    def run(*tensors):
        request.infer([t.numpy() for t in tensors])

    return run, compiled.get_property("INFERENCE_PRECISION_HINT")


def measure(shape: Shape, weights, args) -> list[str]:
    fp32 = Span([Layer(shape, w) for w in weights]).eval()
    ways: list[tuple[str, nn.Module | None, torch.dtype, str]] = [
        ("torch fp32 eager (reference)", fp32, torch.float32, "eager"),
        (
            "torch int8 eager, bf16 activations",
            quantized_span(fp32, "int8"),
            torch.bfloat16,
            "eager",
        ),
        (
            "torch int4 eager, bf16 activations",
            quantized_span(fp32, "int4"),
            torch.bfloat16,
            "eager",
        ),
    ]
    if args.compile:
        for fmt in ("int8", "int4"):
            ways.append(
                (f"torch {fmt} compiled", quantized_span(fp32, fmt), torch.bfloat16, "compile")
            )
    rows, base = [], {}
    for label, module, dtype, how in ways:
        with torch.inference_mode():
            began = time.perf_counter()
            run = torch.compile(module, dynamic=False) if how == "compile" else module
            run(*inputs(shape, 1, dtype))
            start = time.perf_counter() - began  # to the first answer (compiling included)
            times = {b: time_steps(run, inputs(shape, b, dtype), args.repeats) for b in (1, 8)}
        rows.append((label, times, weight_bytes(module), start))
        base = base or times
    if args.openvino:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            rows.append((f"OpenVINO: skipped ({exc})", None, 0, 0))
        else:
            for label, module in (
                ("OpenVINO fp32 weights", fp32),
                ("OpenVINO int8 weights", dequant_span(fp32)),
            ):
                began = time.perf_counter()
                run, precision = openvino_runner(module, inputs(shape, 1, torch.float32))
                run(*inputs(shape, 1, torch.float32))
                start = time.perf_counter() - began
                times = {
                    b: time_steps(run, inputs(shape, b, torch.float32), args.repeats)
                    for b in (1, 8)
                }
                rows.append((f"{label} ({precision} compute)", times, weight_bytes(module), start))
    lines = [
        f"**{shape.name}**, one decode step, {PAST}-token KV cache, {args.threads} threads, "
        f"fastest of {args.repeats} steps",
        "",
        "| way | batch 1 ms | tok/s | × fp32 | batch 8 ms | tok/s | × fp32 | weights MB "
        "| start-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, times, size, start in rows:
        if times is None:
            lines.append(f"| {label} | | | | | | | | |")
            continue
        cells = []
        for batch in (1, 8):
            ms = times[batch] * 1e3
            cells += [
                f"{ms:.1f}",
                f"{batch / times[batch]:.0f}",
                f"{base[batch] / times[batch]:.2f}",
            ]
        lines.append(f"| {label} | {' | '.join(cells)} | {size / 1e6:.0f} | {start:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--big-layers", type=int, default=2, help="layers of the 8B-shaped span (0: none)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = []
    spans = [(SMOLLM2, smollm2_weights)]
    if args.big_layers:  # 0 skips the 8B-shaped span
        big = llama3_8b(args.big_layers)
        spans.append((big, lambda: random_weights(big)))
    for shape, weights in spans:
        lines += measure(shape, weights(), args) + [""]
        print("\n".join(lines))
    if not args.no_record:
        append("Ways to run a quantized span (bench/quant_paths.py)", lines)


if __name__ == "__main__":
    main()
