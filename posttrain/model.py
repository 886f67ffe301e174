"""The Gemma 3 text decoder, and nothing else.

Numbers and rules come from the Gemma 3 Technical Report, Gemma Team 2025, arXiv:2503.19786 (checked against
google/gemma_pytorch and transformers). Checkpoint formats are handled in checkpoint.py;
this file knows only our own parameter names, which mirror the HF ones without the
`model.` prefix so conversion stays a key rename.

Shapes: B batch, T tokens, H query heads, K key/value heads, D head_dim, C hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 262_144  # rows of the (tied) embedding; 262208 in multimodal checkpoints
    hidden_size: int = 640  # C, width of the residual stream
    intermediate_size: int = 2048  # width of the gated MLP
    num_layers: int = 18  # decoder blocks
    num_heads: int = 4  # query heads H
    num_kv_heads: int = 1  # key/value heads K (GQA: H % K == 0)
    head_dim: int = 256  # D; not tied to hidden_size / num_heads in Gemma 3
    query_pre_attn_scalar: float = 256  # attention scores are scaled by this ** -0.5
    sliding_window: int = 512  # W: query i sees keys i - W < j <= i on sliding layers
    max_position_embeddings: int = 32_768  # trained context length (informational; RoPE has no table)
    rope_local_base: float = 10_000.0  # RoPE base on sliding layers, never scaled
    rope_global_base: float = 1_000_000.0  # RoPE base on global layers
    rope_global_scaling: float = 1.0  # linear scaling factor on global layers (8 for 4B/12B/27B)
    rms_norm_eps: float = 1e-6
    # "sliding_attention" or "full_attention" per layer; empty means Gemma 3's pattern,
    # where layer i (0-based) is global iff (i + 1) % 6 == 0.
    layer_types: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(GLOBAL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
        if bad := sorted(set(self.layer_types) - {SLIDING, GLOBAL}):
            problems.append(f"layer_types may hold only '{SLIDING}' and '{GLOBAL}', got {bad}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.sliding_window < 1:
            problems.append(f"sliding_window ({self.sliding_window}) must be at least 1")
        if problems:
            raise ValueError("invalid Gemma 3 config: " + "; ".join(problems))

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == GLOBAL

    def with_(self, **changes) -> "GemmaConfig":
        """A copy with fields changed; layer_types is recomputed unless given."""
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return replace(self, **changes)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> dict[str, int]:
        """KV-cache bytes one token adds on global layers, and on sliding layers before the ring fills."""
        per_layer = 2 * self.num_kv_heads * self.head_dim * bytes_per_value
        n_global = sum(self.is_global(i) for i in range(self.num_layers))
        return {"global": n_global * per_layer, "sliding": (self.num_layers - n_global) * per_layer}


# The released Gemma 3 text models (the Gemma 3 report's Tables 1 and 3).
PRESETS: dict[str, GemmaConfig] = {
    "270m": GemmaConfig(),
    "1b": GemmaConfig(
        hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1,
    ),
    "4b": GemmaConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_layers=34, num_heads=8,
        num_kv_heads=4, sliding_window=1024, max_position_embeddings=131_072, rope_global_scaling=8.0,
    ),
    "12b": GemmaConfig(
        vocab_size=262_208, hidden_size=3840, intermediate_size=15_360, num_layers=48, num_heads=16,
        num_kv_heads=8, sliding_window=1024, max_position_embeddings=131_072, rope_global_scaling=8.0,
    ),
    "27b": GemmaConfig(
        vocab_size=262_208, hidden_size=5376, intermediate_size=21_504, num_layers=62, num_heads=32,
        num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
        max_position_embeddings=131_072, rope_global_scaling=8.0,
    ),
}


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


def rope_inv_freq(head_dim: int, base: float, scaling: float = 1.0) -> torch.Tensor:
    """Inverse frequencies (D/2,) of rotate-half RoPE; linear scaling divides them by `scaling`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (base**exponents) / scaling).float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, N, T, D) by positions (B, T), rotate-half layout, angles in float32."""
    angles = positions[:, None, :, None].float() * inv_freq.to(x.device)  # (B, 1, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)


def attention_mask(
    q_index: torch.Tensor, k_index: torch.Tensor, window: int | None, segments: torch.Tensor | None,
    q_segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk): causal, within `window` (i - W < j <= i), same segment.

    q_index (Tq,) and k_index (Tk,) are indices into the sequence; segments (B, Tk) ids of the
    keys and q_segments (B, Tq) of the queries. True means "may attend".
    """
    diff = q_index[:, None] - k_index[None, :]  # (Tq, Tk)
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed[None, None]
    if segments is not None:
        same = q_segments[:, :, None] == segments[:, None, :]  # (B, Tq, Tk)
        allowed = allowed & same[:, None]
    return allowed


# Above this many query tokens, masked attention runs in query blocks so no (T x T) mask exists.
ATTENTION_QUERY_BLOCK = 1024


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None,
    segments: torch.Tensor | None,
) -> torch.Tensor:
    """Self-attention over a whole sequence. q (B, H, T, D), k/v (B, K, T, D) -> (B, H, T, D).

    Plain causal attention goes to SDPA with is_causal (no mask at all). A sliding window or
    packed segments need a mask; for long sequences it is built per block of queries, and a
    sliding block only reads the W - 1 keys before it, so memory stays O(T * block).
    """
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if segments is None and (window is None or T <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    index = torch.arange(T, device=q.device)
    if T <= ATTENTION_QUERY_BLOCK:
        mask = attention_mask(index, index, window, segments, segments)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    out = []
    for start in range(0, T, ATTENTION_QUERY_BLOCK):
        end = min(start + ATTENTION_QUERY_BLOCK, T)
        k_start = 0 if window is None else max(0, start - window + 1)
        q_idx, k_idx = index[start:end], index[k_start:end]
        seg_q = None if segments is None else segments[:, start:end]
        seg_k = None if segments is None else segments[:, k_start:end]
        mask = attention_mask(q_idx, k_idx, window, seg_k, seg_q)
        out.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, k_start:end], v[:, :, k_start:end],
            attn_mask=mask, scale=scale, enable_gqa=gqa,
        ))
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.is_global = cfg.is_global(layer)
        self.window = None if self.is_global else cfg.sliding_window
        self.scale = cfg.query_pre_attn_scalar**-0.5
        C, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, K * D, bias=False)
        self.v_proj = nn.Linear(C, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.rope = (cfg.rope_global_base, cfg.rope_global_scaling) if self.is_global else (cfg.rope_local_base, 1.0)
        self.register_buffer("inv_freq", rope_inv_freq(D, *self.rope), persistent=False)

    def reset_rope(self, device: torch.device | str) -> None:
        """Recompute the RoPE table, e.g. after weights were assigned into a meta-device build."""
        self.inv_freq = rope_inv_freq(self.head_dim, *self.rope).to(device)

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """q (B, H, T, D), k and v (B, K, T, D): projected, QK-normed, q and k rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q = apply_rope(self.q_norm(q), positions, self.inv_freq)  # QK-norm comes before RoPE
        k = apply_rope(self.k_norm(k), positions, self.inv_freq)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, positions)
        y = causal_attention(q, k, v, scale=self.scale, window=self.window, segments=segments)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """Pre- and post-norm around both branches; the post norms act before the residual add."""

    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, segments))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    """Gemma 3 text decoder with the output head tied to the embedding.

    `hidden_states(ids)` gives the final-normed hidden states (B, T, C) for chunked losses and
    reward heads; `forward(ids)` adds the vocabulary projection, (B, T, V) logits.
    """

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.activation_checkpointing = False  # recompute each block in backward to save memory

    def reset_rope(self) -> None:
        """Recompute non-persistent RoPE buffers on the device of the weights (after a meta build)."""
        device = self.embed_tokens.weight.device
        for block in self.layers:
            block.self_attn.reset_rope(device)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled token embeddings. `weight`: look up in this tensor instead of through the embedding
        module (the sampler passes the gathered weight: under ZeRO-3 the module's own forward hook
        would partition it again right after the lookup, under the sampler's feet)."""
        x = self.embed_tokens(ids) if weight is None else F.embedding(ids, weight)
        # sqrt(C) is rounded to the weight dtype before multiplying, as in the reference
        # implementations: in bf16 the 270M's sqrt(640) = 25.298 becomes 25.25.
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype, device=x.device)

    def hidden_states(
        self, ids: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> final-normed hidden states (B, T, C).

        positions (B, T): RoPE positions, default 0..T-1 (restart them per packed document).
        segments (B, T): ids of packed documents or padding; tokens attend only within their own
        segment. Default: one segment per row.
        """
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.embed(ids)
        for block in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, positions, segments, use_reentrant=False)
            else:
                x = block(x, positions, segments)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary projection with the tied embedding: (..., C) -> (..., V)."""
        return F.linear(hidden, self.embed_tokens.weight)  # a GEMM on the weight as stored, no transpose copy

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(ids, positions, segments))


def init_weights(model: Gemma3, std: float = 0.02, generator: torch.Generator | None = None) -> Gemma3:
    """Random init for models trained from scratch or tests: normal(0, std) matrices, zero norms."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.ndim == 1:  # RMSNorm weights: zero means a scale of exactly 1
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
    return model


def param_counts(cfg: GemmaConfig) -> dict[str, int]:
    """Parameter counts from a meta-device build (no memory): total, embedding, non_embedding."""
    with torch.device("meta"):
        model = Gemma3(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def build_model(cfg: GemmaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> Gemma3:
    """A randomly initialised model (normal(0, 0.02) matrices, zero norms). Meta device: no init."""
    with torch.device(device):
        model = Gemma3(cfg).to(dtype)
    if str(device) != "meta":
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        init_weights(model, generator=gen)
    return model


def pruned_config(cfg: GemmaConfig, keep: list[int]) -> GemmaConfig:
    """The architecture of `prune_layers(model, keep)`: the kept layers, each keeping its type."""
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= cfg.num_layers:
        raise ValueError(f"layers to keep must be distinct, ascending and within 0..{cfg.num_layers - 1}; got {keep}")
    return cfg.with_(num_layers=len(keep), layer_types=tuple(cfg.layer_types[i] for i in keep))


def prune_layers(model: Gemma3, keep: list[int]) -> Gemma3:
    """A smaller student initialised from a model: its embedding, final norm and the layers `keep`
    (each keeps its weights and its type, so a global layer stays global)."""
    cfg = pruned_config(model.config, keep)
    small = build_model(cfg, device="meta", dtype=model.embed_tokens.weight.dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            if int(i) in keep:
                state[f"layers.{keep.index(int(i))}.{rest}"] = tensor
        else:
            state[name] = tensor
    small.load_state_dict(state, strict=True, assign=True)
    small.reset_rope()
    return small


__all__ = [
    "GemmaConfig", "PRESETS", "Gemma3", "RMSNorm", "build_model", "init_weights", "param_counts", "prune_layers",
    "pruned_config",
    "SLIDING", "GLOBAL",
]
