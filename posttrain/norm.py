"""Gemma's RMSNorm, shared by the text decoder and the multimodal projector."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Gemma RMSNorm: float32 math, scale (1 + w) with w initialised at zero, cast back at the end."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # (1 + w) is formed in float32 too: in bf16, 1 + small w rounds away the weight.
        return (xf * (1.0 + self.weight.float())).type_as(x)
