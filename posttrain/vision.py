"""Gemma 3's eyes: the SigLIP vision tower and the multimodal projector.

Gemma 3 4B, 12B and 27B share one frozen SigLIP so400m/14 encoder (the Gemma 3 report, section 2.1;
SigLIP: Zhai et al. 2023, arXiv:2303.15343): a 896 x 896 image becomes 64 x 64 = 4096 patch
vectors of width 1152, with no pooling head. The projector averages them 4 x 4 down to 256 "soft
tokens", applies Gemma's RMSNorm and maps them to the text model's width (x @ W, W of shape
(vision width, text width)). In the decoder these vectors replace the embeddings of the image
placeholder tokens, after the text embedding's sqrt(C) scale (the features are not scaled).

Parameter names mirror transformers' SiglipVisionModel (without its `vision_model.` level) and
Gemma3MultiModalProjector, so checkpoint conversion stays a key rename (checkpoint.py).

Shapes: N images, P patches per image, S soft tokens per image, E vision width, C text width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
# <image_soft_token> (the placeholder the projector's vectors replace), <start_of_image>, <end_of_image>
from .tokenizer import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower and projector; defaults are the released models' (SigLIP so400m/14 at 896)."""

    hidden_size: int = 1152  # E
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6  # the tower's LayerNorms and the projector's RMSNorm
    mm_tokens_per_image: int = 256  # S: soft tokens per image after pooling (a square)
    image_token_id: int = IMAGE_TOKEN_ID
    boi_token_id: int = BOI_TOKEN_ID
    eoi_token_id: int = EOI_TOKEN_ID

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image:
            problems.append(f"mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square")
        elif side and (self.image_size // self.patch_size) % side:
            problems.append(f"patches per side ({self.image_size // self.patch_size}) must be divisible by "
                            f"sqrt(mm_tokens_per_image) = {side}")
        if problems:
            raise ValueError("invalid vision config: " + "; ".join(problems))

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # P
        return self.patches_per_side ** 2

    @property
    def pool_kernel(self) -> int:
        return self.patches_per_side // math.isqrt(self.mm_tokens_per_image)


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches (a strided convolution) plus a learned position per patch; no class token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, E), patch p = row * patches_per_side + col."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        E = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, E = x.shape
        q, k, v = (proj(x).view(N, P, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # bidirectional, no mask
        return self.out_proj(y.transpose(1, 2).reshape(N, P, E))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    """SigLIP's image encoder without its pooling head: (N, 3, H, W) -> (N, P, E), after the final LayerNorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Projector(nn.Module):
    """Tower output -> soft tokens in the text model's space: average pool, RMSNorm (1 + w), x @ W."""

    def __init__(self, cfg: VisionConfig, text_hidden: int):
        super().__init__()
        self.cfg = cfg
        # (E, C), used as x @ W: transformers' layout, not nn.Linear's
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(cfg.hidden_size, text_hidden))
        self.mm_soft_emb_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, P, E) -> (N, S, C)."""
        N, P, E = patches.shape
        side = self.cfg.patches_per_side
        grid = patches.transpose(1, 2).reshape(N, E, side, side).contiguous()  # pooling sums in row order
        pooled = F.avg_pool2d(grid, self.cfg.pool_kernel).flatten(2).transpose(1, 2)  # (N, S, E), row-major
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(patches)


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) block ids: k for the k-th contiguous run of image tokens (type 1) in a row, -1 for text.

    Tokens of one block attend to each other both ways; this is how transformers groups them, so two
    image runs with no text token between them would form one block (the <start_of_image> and
    <end_of_image> wrappers always separate them)."""
    is_image = token_type_ids == 1
    starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


def param_count(cfg: VisionConfig, text_hidden: int) -> dict[str, int]:
    """Parameters of the tower and the projector, from a meta-device build."""
    with torch.device("meta"):
        tower, projector = VisionTower(cfg), Projector(cfg, text_hidden)
    return {"tower": sum(p.numel() for p in tower.parameters()),
            "projector": sum(p.numel() for p in projector.parameters())}


__all__ = [
    "BOI_TOKEN_ID", "EOI_TOKEN_ID", "IMAGE_TOKEN_ID", "Projector", "VisionConfig", "VisionTower", "image_blocks",
    "param_count",
]
