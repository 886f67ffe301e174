"""Fake quantization (posttrain/quant.py): Q4_0 equals the gguf package's quantize-then-dequantize bit
for bit, int4 and SFP8 equal values computed by hand from their formulas, SFP8 keeps at most 121
magnitudes per row, the straight-through gradient is the identity, and quantizing twice changes nothing."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from posttrain.quant import fake_quantize, int4, q4_0, sfp8


def gguf_q4_0(w: torch.Tensor) -> torch.Tensor:
    from gguf.quants import dequantize, quantize

    packed = quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert packed.dtype == np.uint8 and packed.shape[-1] == w.shape[-1] // 32 * 18  # 4.5 bits per weight
    return torch.from_numpy(dequantize(packed, gguf.GGMLQuantizationType.Q4_0).copy()).reshape(w.shape)


def random_weights():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(64, 128, generator=g) * 0.02, torch.randn(8, 1024, generator=g) * 3.0,
         torch.randn(3, 32, generator=g).pow(3)]  # heavy tails
    ties = torch.zeros(2, 64)
    ties[0, :32] = 0.5
    ties[0, 5] = -0.5  # opposite signs, equal magnitude: the first one sets the scale
    ties[1, 40] = 1e-3  # an all-zero block beside a block with one value
    return [*w, ties]


@pytest.mark.parametrize("i", range(4))
def test_q4_0_equals_gguf_bit_for_bit(i):
    w = random_weights()[i]
    assert torch.equal(q4_0(w), gguf_q4_0(w))


@pytest.mark.slow
def test_q4_0_equals_gguf_on_the_real_270m():
    import posttrain

    model = posttrain.load_model("gemma3-270m")
    for name in ("layers.0.self_attn.q_proj.weight", "layers.3.self_attn.o_proj.weight",
                 "layers.5.mlp.down_proj.weight", "layers.17.mlp.gate_proj.weight"):
        w = model.state_dict()[name].float()
        assert torch.equal(q4_0(w), gguf_q4_0(w)), name


def test_q4_0_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_0(torch.ones(2, 48))


def test_int4_fixture():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.05], [-2.0, 1.0, 0.4, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0: s = 7 / 0.7 = 10, q = round([7, -3.5, 1, 0.5]) = [7, -4, 1, 0] (half to even), / 10
    # row 1: s = 3.5, q = round([-7, 3.5, 1.4, 0]) = [-7, 4, 1, 0], / 3.5; row 2 stays 0
    want = torch.tensor([[0.7, -0.4, 0.1, 0.0], [-2.0, 4 / 3.5, 1 / 3.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(int4(w), want, rtol=0, atol=1e-7)
    assert int4(w)[0].mul(10).round().abs().max() <= 8


def test_sfp8_fixture():
    w = torch.tensor([[3.75, -1.6, 0.6, 0.02, 1e-7, 2.4e-7, 0.0, 2.4e-6, 5e-7, 1.2e-6]], dtype=torch.float64)
    # s = 1.875 / 3.75 = 0.5, a = |w| / 2
    # 0.8: low 0.5, step 1/16, round(4.8) = 5 -> 0.8125; 0.3: low 0.25, step 1/32, round(1.6) = 2 -> 0.3125
    # 0.01: low 2^-7 (> 2^-8), step 2^-10, round(2.24) = 2 -> 2^-7 + 2^-9
    # 5e-8 < 0.9375 * 2^-23 -> 0; 1.2e-7 lies in [0.9375, 1.25) x 2^-23 -> 1.25 * 2^-23
    # 1.2e-6: low 2^-20, step 2^-22, round(1.03) = 1 -> 2^-20 + 2^-22
    # under 1e-6 the grid is 2^-20's: 2.5e-7 -> round(-2.95) = -3 -> 2^-20 - 3 * 2^-22 = 2^-22;
    # 6e-7 -> round(-1.48) = -1 -> 3 * 2^-22
    mags = [1.875, 0.8125, 0.3125, 2 ** -7 + 2 ** -9, 0.0, 1.25 * 2 ** -23, 0.0, 2 ** -20 + 2 ** -22, 2 ** -22,
            3 * 2 ** -22]
    want = torch.tensor([mags], dtype=torch.float64) * torch.sign(w) / 0.5
    torch.testing.assert_close(sfp8(w), want, rtol=1e-12, atol=0)
    # below 2^-7 the mantissa has 2 bits: 0.003 -> low 2^-9, step 2^-11, round(2.14) = 2 -> 1.5 * 2^-9
    small = torch.tensor([[1.875, 0.003]], dtype=torch.float64)
    assert sfp8(small)[0, 1].item() == pytest.approx(1.5 * 2 ** -9, rel=1e-12)


def test_sfp8_has_121_magnitudes_per_row():
    dense = torch.logspace(-9, torch.log10(torch.tensor(1.875)).item(), 1_000_000, dtype=torch.float64)
    assert len(torch.unique(sfp8(dense[None])[0])) == 121  # every magnitude is hit once the row is dense
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 100_000, generator=g) * torch.logspace(-10, 0, 100_000)
    for row in sfp8(w):  # equal magnitudes give equal |w_hat| (one scale per row)
        assert 100 < len(torch.unique(row.abs())) <= 121


@pytest.mark.parametrize("fmt", ["q4_0", "int4", "sfp8"])
def test_straight_through_gradient_and_idempotence(fmt):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(16, 64, generator=g) * 0.1).requires_grad_()
    out = fake_quantize(w, fmt)
    assert not torch.equal(out.detach(), w.detach())  # it does quantize
    upstream = torch.randn(16, 64, generator=g)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    once = out.detach()
    assert torch.equal(fake_quantize(once, fmt), once)


def test_unknown_format_is_one_clear_error():
    with pytest.raises(ValueError, match="one of q4_0, int4, sfp8"):
        fake_quantize(torch.ones(1, 32), "q8")
