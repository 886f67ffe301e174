"""Fake quantization of linear weights for quantization-aware training (Gemma 3 report, section 2.3).

Three weight formats, each a function w -> w_hat of the same shape and dtype as the float weight
w (out_features, in_features) of an nn.Linear:

- q4_0: llama.cpp's Q4_0 (ggml's `quantize_row_q4_0_ref`): blocks of 32 consecutive inputs of a row,
  one scale d = m / -8 each, m the block's value of largest magnitude (with its sign),
  q = clip(trunc(x / d + 8.5), 0, 15), stored with d in float16: w_hat = fp16(d) * (q - 8).
  4.5 bits per weight. Equal, bit for bit, to the `gguf` package's quantize-then-dequantize.
- int4: symmetric int4 with one scale per output row (gemma's `INT4` simulation):
  s = 7 / max|w_row|, w_hat = clip(round(w * s), -8, 7) / max(s, 1e-6).
- sfp8: "switched floating point" with 8 bits (gemma.cpp's SFP; gemma's `SFP8` simulation): each row is
  scaled so its largest magnitude is 1.875, then magnitudes keep 3 mantissa bits at or above 2^-7 and
  2 below; under 1e-6 they fall on 2^-20's grid, down to 1.25 * 2^-23 (under 0.9375 * 2^-23 they are 0):
  121 magnitudes in all, 0 included, so a sign bit and 7 bits hold one.

`fake_quantize(w, fmt)` wraps a format in the straight-through estimator: the forward value is the
quantized weight, the gradient with respect to w is the identity. Scales are recomputed from the
current weight on every call (no learned scales), so fake quantization is idempotent.
"""

from __future__ import annotations

from typing import Callable

import torch

Q4_0_BLOCK = 32
SFP8_MAX = 1.875
SFP8_SMALLEST = 1.25 * 2.0 ** -23  # the smallest non-zero magnitude
SFP8_ZERO_BELOW = 0.9375 * 2.0 ** -23  # magnitudes below this become 0


def q4_0(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp Q4_0 quantize-then-dequantize along the last dimension (a multiple of 32)."""
    if w.shape[-1] % Q4_0_BLOCK:
        raise ValueError(f"q4_0 needs the input dimension to be a multiple of {Q4_0_BLOCK}, got shape "
                         f"{tuple(w.shape)}; fix: leave this tensor unquantized")
    b = w.detach().float().reshape(-1, Q4_0_BLOCK)
    m = b.gather(1, b.abs().argmax(1, keepdim=True))  # the signed value of largest magnitude (the first such)
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.clamp(torch.trunc(b * inv + 8.5), 0, 15)  # x/d + 8.5 >= 0.5, so trunc is floor
    return (d.half().float() * (q - 8)).reshape(w.shape).to(w.dtype)


def int4(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4, one scale per output row (the last dimension is reduced)."""
    x = w.detach().float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    s = 7.0 / amax.clamp_min(1e-30)  # an all-zero row stays zero (7 / 0 would make it NaN)
    return (torch.clamp(torch.round(x * s), -8, 7) / s.clamp_min(1e-6)).to(w.dtype)


def sfp8(w: torch.Tensor) -> torch.Tensor:
    """Switched fp8, one scale per output row (the last dimension is reduced); computed in float64."""
    x = w.detach().double()
    s = SFP8_MAX / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    a = (x * s).abs()
    # the binade's lower bound; below 1e-6 every magnitude is placed on 2^-20's grid (gemma's simulation)
    low = torch.exp2(torch.floor(torch.log2(a.clamp_min(1e-6)))).clamp_min(SFP8_SMALLEST)
    step = torch.where(low > 2.0 ** -8, low / 8, low / 4)  # 3 mantissa bits from 2^-7 up, 2 below
    mag = torch.round((a - low) / step) * step + low
    mag = torch.where(a < SFP8_SMALLEST, torch.full_like(a, SFP8_SMALLEST), mag)
    mag = torch.where(a < SFP8_ZERO_BELOW, torch.zeros_like(a), mag)
    return (torch.sign(x) * mag / s).to(w.dtype)


FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"q4_0": q4_0, "int4": int4, "sfp8": sfp8}
# the weights QAT quantizes: the seven linear weights of every decoder block (not the tied embedding,
# the norms or a vision tower)
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def is_linear(name: str) -> bool:
    """Whether a parameter name of our model (layers.<i>.self_attn.q_proj.weight, ...) is one of LINEAR."""
    parts = name.split(".")
    return parts[0] == "layers" and ".".join(parts[2:4]) in LINEAR and parts[-1] == "weight"


@torch.no_grad()
def quantize_linear_(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """Replace every LINEAR weight of `model` by its quantized value in format `fmt`, in place."""
    for name, p in model.named_parameters():
        if is_linear(name):
            p.copy_(FORMATS[fmt](p))
    return model


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The quantized value of w in format `fmt`, with the identity as its gradient (straight through)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; fix: one of {', '.join(FORMATS)}")
    return _StraightThrough.apply(w, FORMATS[fmt](w))


def set_format(model: torch.nn.Module, fmt: str | None, *, embedding: bool = False) -> torch.nn.Module:
    """Make `model` (a Gemma3) compute with fake-quantized LINEAR weights in format `fmt` (None: float
    again); `embedding` quantizes the tied embedding/head too. The parameters stay float (the master
    weights QAT trains); the forward, the sampler and save_pretrained see the quantized values."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; fix: one of {', '.join(FORMATS)}")
    for name, module in model.named_modules():
        if is_linear(name + ".weight"):
            module.quant = fmt
    model.embed_quant = fmt if embedding else None
    return model


@torch.no_grad()
def snap_toward_grid_(model: torch.nn.Module, fmt: str, fraction: float) -> torch.nn.Module:
    """Move every LINEAR weight `fraction` of the way to its quantized value, in place: w += f (q(w) - w).
    Each weight stays in its rounding cell, so the quantized model is unchanged (PTQ is the same), but a
    weight lying exactly on a rounding boundary (a model dequantized from another 4-bit format has many)
    moves inside the cell it rounds to, and no longer re-rounds at the first tiny optimizer step."""
    if not 0 <= fraction < 1:
        raise ValueError(f"snap fraction {fraction} must be in [0, 1)")
    if fraction:
        for name, p in model.named_parameters():
            if is_linear(name):
                p.add_(FORMATS[fmt](p) - p, alpha=fraction)
    return model


def quantized_names(model: torch.nn.Module) -> list[str]:
    """The parameter names whose values the model computes with quantized (set_format)."""
    out = [name + ".weight" for name, m in model.named_modules() if getattr(m, "quant", None) is not None]
    return (["embed_tokens.weight"] if getattr(model, "embed_quant", None) else []) + out


@torch.no_grad()
def effective_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with each fake-quantized weight replaced by its quantized value: what the
    model computes with, so an export holds the quantized model and never the float master weights."""
    state = model.state_dict()
    modules = dict(model.named_modules())
    for name in quantized_names(model):
        owner = name.rsplit(".", 1)[0]
        state[name] = model.head_weight() if name == "embed_tokens.weight" else modules[owner].effective_weight()
    return state


__all__ = ["q4_0", "int4", "sfp8", "fake_quantize", "set_format", "snap_toward_grid_", "quantized_names", "effective_state_dict", "FORMATS", "LINEAR", "is_linear", "quantize_linear_", "Q4_0_BLOCK"]
