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

from .norm import RMSNorm
from .quant import fake_quantize
from .vision import Projector, VisionConfig, VisionTower, image_blocks

SLIDING = "sliding_attention"
# our parameter names of the vision tower and the projector (multimodal models only)
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
GLOBAL = "full_attention"


class Linear(nn.Linear):
    """nn.Linear (no bias) whose forward can read its weight fake-quantized (quantization-aware
    training): `quant` names a posttrain.quant format, None (the default) for the float weight.
    `effective_weight()` is the weight as the forward uses it; whatever computes with the weight
    outside the forward (the sampler, exports) reads that, so nothing silently uses the float values."""

    quant: str | None = None

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.quant is None else fake_quantize(self.weight, self.quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


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
    # The SigLIP tower and projector of a multimodal checkpoint (4B, 12B, 27B); None: a text-only model.
    vision: VisionConfig | None = None

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


# The released Gemma 3 models (the Gemma 3 report's Tables 1 and 3); 4B and up see (SigLIP, vision.py).
PRESETS: dict[str, GemmaConfig] = {
    "270m": GemmaConfig(),
    "1b": GemmaConfig(
        hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1,
    ),
    "4b": GemmaConfig(
        vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_layers=34, num_heads=8,
        num_kv_heads=4, sliding_window=1024, max_position_embeddings=131_072, rope_global_scaling=8.0,
        vision=VisionConfig(),
    ),
    "12b": GemmaConfig(
        vocab_size=262_208, hidden_size=3840, intermediate_size=15_360, num_layers=48, num_heads=16,
        num_kv_heads=8, sliding_window=1024, max_position_embeddings=131_072, rope_global_scaling=8.0,
        vision=VisionConfig(),
    ),
    "27b": GemmaConfig(
        vocab_size=262_208, hidden_size=5376, intermediate_size=21_504, num_layers=62, num_heads=32,
        num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
        max_position_embeddings=131_072, rope_global_scaling=8.0, vision=VisionConfig(),
    ),
}


def rope_inv_freq(head_dim: int, base: float, scaling: float = 1.0) -> torch.Tensor:
    """Inverse frequencies (D/2,) of rotate-half RoPE; linear scaling divides them by `scaling`.

    Computed in float32, as the reference implementations do: the float64 values rounded once differ
    from them by an ulp in about a third of the frequencies, which moves logits by ~1e-4 at position
    32K and more further out (tests/test_long_context.py pins positions up to 131,071)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    return inv_freq / scaling if scaling != 1.0 else inv_freq


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
    q_segments: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
    q_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk): causal or same image block, within `window`
    (j > i - W: it limits the past only), same segment.

    q_index (Tq,) and k_index (Tk,) are indices into the sequence; segments (B, Tk) ids of the
    keys and q_segments (B, Tq) of the queries; blocks / q_blocks (B, Tk) / (B, Tq) image block ids
    (vision.image_blocks, -1 for text): the tokens of one image see each other both ways, on
    global and sliding layers alike, as transformers' Gemma 3 does. True means "may attend".
    """
    diff = q_index[:, None] - k_index[None, :]  # (Tq, Tk)
    allowed = (diff >= 0)[None, None]
    if blocks is not None:
        same_image = (q_blocks[:, :, None] == blocks[:, None, :]) & (q_blocks[:, :, None] >= 0)  # (B, Tq, Tk)
        allowed = allowed | same_image[:, None]
    if window is not None:
        allowed = allowed & (diff < window)[None, None]
    if segments is not None:
        same = q_segments[:, :, None] == segments[:, None, :]  # (B, Tq, Tk)
        allowed = allowed & same[:, None]
    return allowed


# Above this many query tokens, masked attention runs in query blocks so no (T x T) mask exists.
ATTENTION_QUERY_BLOCK = 1024


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None,
    segments: torch.Tensor | None, blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention over a whole sequence. q (B, H, T, D), k/v (B, K, T, D) -> (B, H, T, D).

    Plain causal attention goes to SDPA with is_causal (no mask at all). A sliding window, packed
    segments or image blocks need a mask; for long sequences it is built per block of queries, and a
    sliding block only reads the W - 1 keys before it (plus the rest of an image its queries are in),
    so memory stays O(T * block).
    """
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if segments is None and blocks is None and (window is None or T <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    index = torch.arange(T, device=q.device)
    if T <= ATTENTION_QUERY_BLOCK:
        mask = attention_mask(index, index, window, segments, segments, blocks, blocks)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    last_of_block = None if blocks is None else _last_of_block(blocks)
    out = []
    for start in range(0, T, ATTENTION_QUERY_BLOCK):
        end = min(start + ATTENTION_QUERY_BLOCK, T)
        k_start = 0 if window is None else max(0, start - window + 1)
        k_end = end if last_of_block is None else max(end, int(last_of_block[:, start:end].max()) + 1)
        q_idx, k_idx = index[start:end], index[k_start:k_end]
        cut = {name: (None if t is None else t[:, start:end], None if t is None else t[:, k_start:k_end])
               for name, t in (("segments", segments), ("blocks", blocks))}
        mask = attention_mask(q_idx, k_idx, window, cut["segments"][1], cut["segments"][0],
                              cut["blocks"][1], cut["blocks"][0])
        out.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, k_start:k_end], v[:, :, k_start:k_end],
            attn_mask=mask, scale=scale, enable_gqa=gqa,
        ))
    return torch.cat(out, dim=2)


def _last_of_block(blocks: torch.Tensor) -> torch.Tensor:
    """(B, T): for an image token the index of its image's last token, for a text token its own index."""
    B, T = blocks.shape
    index = torch.arange(T, device=blocks.device).expand(B, T)
    # a token is the last of its run when the next token belongs to another block (or the row ends)
    ends = torch.where(blocks != F.pad(blocks, (0, 1), value=-2)[:, 1:], index, T)
    # for each position, the first run end at or after it
    return ends.flip(1).cummin(1).values.flip(1).where(blocks >= 0, index)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.is_global = cfg.is_global(layer)
        self.window = None if self.is_global else cfg.sliding_window
        self.scale = cfg.query_pre_attn_scalar**-0.5
        C, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(C, H * D, bias=False)
        self.k_proj = Linear(C, K * D, bias=False)
        self.v_proj = Linear(C, K * D, bias=False)
        self.o_proj = Linear(H * D, C, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.rope = (cfg.rope_global_base, cfg.rope_global_scaling) if self.is_global else (cfg.rope_local_base, 1.0)
        self.register_buffer("inv_freq", rope_inv_freq(D, *self.rope), persistent=False)
        # None: causal_attention. Set by sequence_parallel.apply to its Ulysses adapter (same signature).
        self.sequence_parallel = None

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor | None,
                blocks: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, positions)
        attend = causal_attention if self.sequence_parallel is None else self.sequence_parallel
        y = attend(q, k, v, scale=self.scale, window=self.window, segments=segments, blocks=blocks)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor | None,
                blocks: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, segments, blocks))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    """Gemma 3 decoder with the output head tied to the embedding; with `config.vision`, also the
    SigLIP tower and the projector that put images into its input (vision.py).

    `hidden_states(ids)` gives the final-normed hidden states (B, T, C) for chunked losses and
    reward heads; `forward(ids)` adds the vocabulary projection, (B, T, V) logits.
    """

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.vision is not None:
            self.vision_tower = VisionTower(cfg.vision)
            self.multi_modal_projector = Projector(cfg.vision, cfg.hidden_size)
        self.activation_checkpointing = False  # recompute each block in backward to save memory
        self.embed_quant: str | None = None  # the tied embedding/head fake-quantized (QAT); None = float

    @property
    def is_multimodal(self) -> bool:
        return self.config.vision is not None

    def reset_rope(self) -> None:
        """Recompute non-persistent RoPE buffers on the device of the weights (after a meta build)."""
        device = self.embed_tokens.weight.device
        for block in self.layers:
            block.self_attn.reset_rope(device)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled token embeddings. `weight`: look up in this tensor instead of through the embedding
        module (the sampler passes the gathered weight: under ZeRO-3 the module's own forward hook
        would partition it again right after the lookup, under the sampler's feet)."""
        vision = self.config.vision
        if vision is not None and vision.image_token_id >= self.config.vocab_size:
            ids = ids.masked_fill(ids == vision.image_token_id, 0)  # a placeholder row; features replace it
        if weight is None and self.embed_quant is not None:
            weight = self.head_weight()
        x = self.embed_tokens(ids) if weight is None else F.embedding(ids, weight)
        # sqrt(C) is rounded to the weight dtype before multiplying, as in the reference
        # implementations: in bf16 the 270M's sqrt(640) = 25.298 becomes 25.25.
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype, device=x.device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images (or crops) -> (N, S, C) soft tokens, in the order of the image blocks."""
        if not self.is_multimodal:
            raise ValueError("pixel_values given to a text-only model; load a Gemma3ForConditionalGeneration "
                             "checkpoint (4B, 12B, 27B) or set model.vision to add a vision tower")
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed_inputs(self, ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's soft tokens written over its placeholder positions, in order.
        image_features (N, S, C), precomputed by image_features(), wins over pixel_values."""
        x = self.embed(ids, weight)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            return x
        where = ids == self.config.vision.image_token_id
        n = int(where.sum())
        if n != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(f"the ids hold {n} image tokens but {image_features.shape[0]} images give "
                             f"{image_features.shape[0]} x {image_features.shape[1]} features; each image "
                             "(and each Pan & Scan crop) needs exactly one block of mm_tokens_per_image tokens")
        return x.masked_scatter(where[..., None], image_features.to(x.dtype))

    def hidden_states(
        self, ids: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
        *, pixel_values: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> final-normed hidden states (B, T, C).

        positions (B, T): RoPE positions, default 0..T-1 (restart them per packed document).
        segments (B, T): ids of packed documents or padding; tokens attend only within their own
        segment. Default: one segment per row.
        pixel_values (N, 3, H, W): the images of the batch, in the order their blocks appear
        (row by row); or image_features (N, S, C), already projected.
        token_type_ids (B, T): 1 at image tokens, 0 elsewhere (transformers' meaning): the tokens of
        one image attend to each other both ways. Default with images: taken from the image token id.
        Under sequence parallelism (sequence_parallel.apply) ids and positions are this rank's shard of T,
        segments and token_type_ids the full rows.
        """
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.embed_inputs(ids, pixel_values=pixel_values, image_features=image_features)
        blocks = None
        if self.is_multimodal:
            if token_type_ids is None and (pixel_values is not None or image_features is not None):
                token_type_ids = (ids == self.config.vision.image_token_id).long()
            if token_type_ids is not None and bool(token_type_ids.any()):
                blocks = image_blocks(token_type_ids)
        for block in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, positions, segments, blocks, use_reentrant=False)
            else:
                x = block(x, positions, segments, blocks)
        return self.norm(x)

    def head_weight(self) -> torch.Tensor:
        """The tied embedding/head as the model computes with it: fake-quantized under `embed_quant`."""
        weight = self.embed_tokens.weight
        return weight if self.embed_quant is None else fake_quantize(weight, self.embed_quant)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary projection with the tied embedding: (..., C) -> (..., V)."""
        return F.linear(hidden, self.head_weight())  # a GEMM on the weight as stored, no transpose copy

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
        **images,
    ) -> torch.Tensor:
        """(B, T, V) logits; images: pixel_values, token_type_ids or image_features as in hidden_states."""
        return self.logits(self.hidden_states(ids, positions, segments, **images))


def init_weights(model: Gemma3, std: float = 0.02, generator: torch.Generator | None = None) -> Gemma3:
    """Random init for models trained from scratch or tests: normal(0, std) matrices, zero RMSNorm
    weights and biases, LayerNorm scales of one (the vision tower's)."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    p.fill_(1.0)
                elif p.ndim == 1:  # RMSNorm weights (zero means a scale of exactly 1) and biases
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
    return model


def param_counts(cfg: GemmaConfig) -> dict[str, int]:
    """Parameter counts from a meta-device build (no memory): total, embedding, non_embedding (the
    text decoder's other weights) and vision (the tower and the projector; 0 for text-only models)."""
    with torch.device("meta"):
        model = Gemma3(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    vision = sum(p.numel() for name, p in model.named_parameters() if name.startswith(VISION_PREFIXES))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding - vision, "vision": vision}


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


def add_vision(model: Gemma3, vision: VisionConfig, seed: int) -> Gemma3:
    """The text model with a new vision tower and projector (random init, seeded); the text weights are
    the same tensors, not copies."""
    if model.is_multimodal:
        raise ValueError("the model already has a vision tower")
    weight = model.embed_tokens.weight
    bigger = Gemma3(model.config.with_(vision=vision)).to(device=weight.device, dtype=weight.dtype)
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    init_weights(bigger.vision_tower, generator=gen)
    init_weights(bigger.multi_modal_projector, generator=gen)
    for name in ("embed_tokens", "layers", "norm"):
        setattr(bigger, name, getattr(model, name))
    bigger.reset_rope()
    return bigger


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
    "GemmaConfig", "PRESETS", "Gemma3", "Linear", "RMSNorm", "add_vision", "build_model", "init_weights", "param_counts", "prune_layers",
    "pruned_config",
    "SLIDING", "GLOBAL", "VISION_PREFIXES", "VisionConfig",
]
