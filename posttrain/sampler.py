"""The built-in KV-cached sampler: exact, RL-shaped, Gemma-3-native.

    sampler = Sampler(model)
    out = sampler.generate([[2, 651, 6037], [2, 9259]], n=4, max_new_tokens=64, temperature=1.0, seed=0)
    out[0][3].tokens, out[0][3].logprobs, out[0][3].finish_reason    # prompt 0, sample 3

Design (README, "Sampling"):
- One static cache per call, sized to the call: global layers hold `longest prompt +
  max_new_tokens` slots; sliding layers hold a ring of min(W, that) slots, so 5 of every 6
  layers cost O(W) whatever the context.
- No padding anywhere: every row keeps its own position. Each prompt is prefilled once, on its
  own, in chunks (no T x T activation), into the first of its n rows, and the cache is copied to
  the other n - 1 rows. Decoding then steps all rows together, one token each; a row that samples a
  stop token leaves the batch and the cache (not on the compiled static path, whose shapes are fixed).
- Log-probs are those of the unmodified model (temperature 1, no truncation) at the sampled
  token, the numbers RL needs; they equal a full forward of the same sequence (tested).
- The model is a plain module: under ZeRO-3 the engine gathers the weights once around a whole
  `generate` call (a rollout phase), never per token.
- CPU path: the decode step's matrix-vector products run on oneDNN with weights prepacked once
  per weight version (`pack_weights`, on by default on CPU): about 2x faster than MKL on skinny
  products, at the cost of a second copy of the weights while the sampler lives.
- GPU path: bf16 works as is; `compile_decode=True` compiles the decode step with static shapes
  (attention over the whole preallocated cache, masked), and with mode "reduce-overhead" on CUDA
  that also captures CUDA graphs. The CPU path never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .losses import _gemm_operand, _mm32
from .model import Gemma3, GemmaConfig, apply_rope
from .vision import image_blocks


class Completion(NamedTuple):
    """One sample. `tokens` include the stop token when finish_reason is "stop"."""

    tokens: list[int]
    logprobs: list[float]  # log p(token | prefix) under the model at temperature 1, one per token
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)


def kv_cache_bytes(cfg: GemmaConfig, context: int, rows: int = 1, bytes_per_value: int = 2,
                   ring: bool = True) -> int:
    """KV-cache bytes for `rows` sequences of `context` tokens; ring=False is a full-length cache."""
    per_token = cfg.kv_bytes_per_token(bytes_per_value)
    sliding_slots = min(cfg.sliding_window, context) if ring else context
    return rows * (per_token["global"] * context + per_token["sliding"] * sliding_slots)


class KVCache:
    """Keys and values of every layer for `rows` sequences.

    Global layer l: k[l], v[l] of shape (rows, K, length, D), slot = position.
    Sliding layer l: (rows, K, ring, D) with ring = min(W, length), slot = position % ring.
    `slot_pos` (rows, ring) records which position each ring slot holds (-1: empty); all sliding
    layers write the same positions, so they share it.
    """

    def __init__(self, cfg: GemmaConfig, rows: int, length: int, dtype: torch.dtype, device: torch.device):
        self.length, self.ring, self.dtype = length, min(cfg.sliding_window, length), dtype
        K, D = cfg.num_kv_heads, cfg.head_dim
        self.k, self.v = [], []
        for layer in range(cfg.num_layers):
            slots = length if cfg.is_global(layer) else self.ring
            self.k.append(torch.zeros(rows, K, slots, D, dtype=dtype, device=device))
            self.v.append(torch.zeros(rows, K, slots, D, dtype=dtype, device=device))
        self.slot_pos = torch.full((rows, self.ring), -1, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices, in their new order): finished sequences leave the batch."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.slot_pos = self.slot_pos.index_select(0, rows)

    def copy_row(self, src: int, dst: slice) -> None:
        """Copy one row's cache (a prefilled prompt) into rows `dst` (its other samples)."""
        for t in self.k + self.v:
            t[dst] = t[src]
        self.slot_pos[dst] = self.slot_pos[src]


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next tokens (R,) from float32 logits (R, V): greedy at temperature 0, else temperature, then
    top-k, then min-p (relative to the most likely token), then top-p (nucleus), then a draw."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token once the tokens before it already cover top_p (the most likely always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p * sorted_p.sum(-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, block: int = 1024) -> torch.Tensor:
    """One index per row of `probs` (R, V), non-negative and not necessarily normalised, drawn in
    proportion to it: inverse-CDF sampling in two levels (the block of `block` entries holding the
    draw, then the entry inside it), one float64 uniform per row. torch.multinomial draws one
    exponential number per entry, R x 262,144 per decode step; this reads the probabilities once
    (4 ms against 400 ms at R = 64, V = 262,208 on a 2-core CPU) and is exact up to float rounding. An
    entry with probability 0 is never drawn."""
    R, V = probs.shape
    full = V // block
    sums = [probs[:, : full * block].view(R, full, block).sum(-1)] if full else []
    if V > full * block:
        sums.append(probs[:, full * block:].sum(-1, keepdim=True))
    bsum = torch.cat(sums, -1).double()
    csum = bsum.cumsum(-1)
    u = (1.0 - torch.rand(R, 1, generator=generator, dtype=torch.float64, device=probs.device)) * csum[:, -1:]
    b = torch.searchsorted(csum, u).clamp_max(csum.shape[1] - 1)  # the first block whose cdf reaches u
    before = torch.where(b > 0, csum.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(u))
    cols = b * block + torch.arange(block, device=probs.device)  # the chosen block's entries
    inner = probs.gather(1, cols.clamp_max(V - 1)).masked_fill(cols >= V, 0.0)
    icdf = inner.cumsum(-1, dtype=torch.float64)
    # the residual, rescaled from the block's float32 sum to its float64 cumsum (the two round apart)
    rest = (u - before) / bsum.gather(1, b) * icdf[:, -1:]
    j = torch.searchsorted(icdf, rest)
    last = block - 1 - (inner.flip(-1) > 0).int().argmax(-1, keepdim=True)  # rounding never lands past it
    return (b * block + torch.minimum(j, last)).squeeze(1)


def _attend(q, k, v, mask, scale):
    """SDPA for cached attention: q (R, H, Tq, D), k/v (R, K, S, D), mask (R or 1, 1, Tq, S)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _onednn_ok(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN can prepack weights of this dtype here: bfloat16 needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT,
    which CPUs with AVX2 only (many AMD EPYCs) lack; there the sampler uses the plain products."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Weights:
    """The weights the sampler computes with, as the model's forward uses them: each linear's
    `effective_weight()` and the model's `head_weight()`. Float weights are the parameters themselves
    (no copy); fake-quantized ones (QAT) are computed once per `generate` call and dropped after it,
    so no stale or gathered copy outlives the call."""

    def __init__(self, model: Gemma3):
        self.model = model
        self.quantized: dict[int, torch.Tensor] = {}
        self.head_operand: torch.Tensor | None = None
        self.calls = 0  # refreshes so far: a quantized value is new at each one

    def refresh(self) -> None:
        self.quantized = {}
        self.head_operand = None
        self.calls += 1
        if self.model.embed_quant is not None:
            self.quantized[id(self.model.embed_tokens)] = self.model.head_weight().detach()
        for block in self.model.layers:
            for m in (*block.self_attn.children(), *block.mlp.children()):
                if getattr(m, "quant", None) is not None:
                    self.quantized[id(m)] = m.effective_weight().detach()

    def clear(self) -> None:
        self.quantized = {}
        self.head_operand = None

    def head(self) -> torch.Tensor:
        """The output head as the training forward's chunked head multiplies it (losses._gemm_operand,
        under the caller's autocast): float32, or bf16 with float32 output on CUDA. Made once per call:
        for a bf16 model on CPU, a float32 copy of the head while `generate` runs."""
        if self.head_operand is None:
            self.head_operand = _gemm_operand(self(self.model.embed_tokens).detach())
        return self.head_operand

    def __call__(self, module: nn.Module) -> torch.Tensor:
        return self.quantized.get(id(module), module.weight)

    def stamp(self, module: nn.Module) -> tuple:
        """Changes whenever the value __call__ gives may have: a parameter's storage or in-place version
        counter (optimizer steps are in-place); a quantized value's refresh."""
        if id(module) in self.quantized:
            return ("quantized", self.calls)
        return (module.weight.data_ptr(), module.weight._version)


class PackedWeights:
    """oneDNN-prepacked copies of a model's linear weights (as Weights gives them), for skinny CPU
    products (decode).

    Products that read the same input are packed as one matrix (q/k/v, and gate/up), so each
    layer makes 4 calls instead of 7. A group is repacked only when one of its weights changed:
    its storage or its in-place version counter, so a sampler reused across RL steps stays correct.
    """

    def __init__(self, model: Gemma3, weights: Weights, rows_hint: int = 8):
        self.model, self.weights, self.rows_hint = model, weights, rows_hint
        self.packed: dict[tuple[int, ...], tuple[tuple, torch.Tensor, list[int]]] = {}

    def groups(self) -> list[tuple[nn.Module, ...]]:
        out = [(self.model.embed_tokens,)]
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            out += [(a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (m.gate_proj, m.up_proj), (m.down_proj,)]
        return out

    def refresh(self) -> None:
        for group in self.groups():
            key = tuple(id(m) for m in group)
            stamp = tuple(self.weights.stamp(m) for m in group)
            if key not in self.packed or self.packed[key][0] != stamp:
                ws = [self.weights(m).detach() for m in group]
                weight = torch.cat(ws) if len(ws) > 1 else ws[0]
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.rows_hint)
                self.packed[key] = (stamp, packed, [w.shape[0] for w in ws])

    def linear(self, group: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, in) times each module's weight -> [(N, out_i)], one packed product."""
        _, packed, sizes = self.packed[tuple(id(m) for m in group)]
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return list(y.split(sizes, dim=-1)) if len(sizes) > 1 else [y]


class Sampler:
    """Batched generation with a static KV cache on a plain (unwrapped) Gemma3 module."""

    def __init__(self, model: Gemma3, *, prefill_chunk: int = 512, compile_decode: bool = False,
                 pack_weights: bool | None = None):
        self.model = model
        self.cfg = model.config
        self.prefill_chunk = prefill_chunk
        self.static = compile_decode
        weight = model.embed_tokens.weight
        if pack_weights is None:  # auto: CPU float32/bfloat16 with oneDNN, and not the compiled path
            pack_weights = (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
                            and not compile_decode and _onednn_ok(weight.dtype))
        self.weights = Weights(model)
        self.packed = PackedWeights(model, self.weights) if pack_weights else None
        self._packed = self.packed  # what this generate call uses (not under autocast)
        # the compiled step takes the sampler as an argument: a bound method kept on self would make a
        # reference cycle, and the sampler (its packed copy of the weights, 1.07 GB on the 270M) would
        # outlive its generate call until Python's cycle collector happened to run
        self._compiled = None
        if compile_decode:
            mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
            self._compiled = torch.compile(type(self)._decode_step, mode=mode, dynamic=False)

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
        stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
        on_token: Callable[[int, int], None] | None = None, images: Sequence[torch.Tensor | None] | None = None,
    ) -> list[list[Completion]]:
        """Sample n completions per prompt (lists of token ids, <bos> included by the caller).

        Returns out[prompt][sample]. stop_token_ids default to <eos> (1) and <end_of_turn> (106);
        pass [] to always generate max_new_tokens. `on_token(row, token)` is called for each new
        token of row `prompt * n + sample` (streaming). A seed makes sampling reproducible.
        images (multimodal models): per prompt, its pixel values (N_i, 3, H, W) in the order of its
        image blocks, or None. Each prompt's images are encoded once, whatever n; the image tokens
        are prefilled attending to their whole image, decoding is causal.
        """
        self._check(prompts, n, max_new_tokens, temperature, top_k, top_p, min_p, images)
        stop = torch.tensor(list((1, 106) if stop_token_ids is None else stop_token_ids), dtype=torch.long)
        device = self.model.embed_tokens.weight.device
        stop = stop.to(device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        self.weights.refresh()
        # under autocast the products run as the training forward's do (packed weights would ignore it)
        self._packed = None if torch.is_autocast_enabled(device.type) else self.packed
        if self._packed is not None:
            self._packed.refresh()
        rows = len(prompts) * n
        length = max(len(p) for p in prompts) + max_new_tokens
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else self.model.embed_tokens.weight.dtype  # the keys and values as the forward makes them
        cache = KVCache(self.cfg, rows, length, dtype, device)

        # 1. prefill each prompt once, copy to its n rows, sample each row's first token
        last_logits = []
        for i, prompt in enumerate(prompts):
            pixels = images[i] if images is not None else None
            features = None if pixels is None else self.model.image_features(pixels.to(device))
            logits = self._prefill(cache, i * n, prompt, device, features)
            if n > 1:
                cache.copy_row(i * n, slice(i * n + 1, (i + 1) * n))
            last_logits.append(logits.expand(n, -1))
        logits = torch.cat(last_logits).float()  # (R, V)
        pos = torch.tensor([len(p) for p in prompts for _ in range(n)], device=device)  # next position per row

        tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        live = torch.arange(rows, device=device)  # the rows still decoding, in cache order
        # 2. decode: sample, record, feed the token back, until every row is finished. A row that stops
        # leaves the batch (and the cache), so a batch costs the tokens it decodes, not rows x longest.
        # The compiled static path keeps every row: its shapes must not change.
        for step in range(max_new_tokens):
            token = sample_tokens(logits, temperature, top_k, top_p, min_p, generator)
            tokens[live, step] = token
            logprobs[live, step] = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
            hit = torch.isin(token, stop) & ~stopped[live]
            if on_token is not None:
                for r, t in zip(live.tolist(), token.tolist()):
                    if not stopped[r]:
                        on_token(r, t)
            lengths[live[hit]] = step + 1
            stopped[live[hit]] = True
            if step == max_new_tokens - 1 or bool(stopped[live].all()):
                break
            if bool(hit.any()) and not self.static:
                keep = (~hit).nonzero().flatten()
                cache.keep(keep)
                live, token, pos = live[keep], token[keep], pos[keep]
            logits = (self._decode_step(cache, token, pos) if self._compiled is None
                      else self._compiled(self, cache, token, pos)).float()
            pos = pos + 1

        self.weights.clear()
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        lengths, stopped = lengths.tolist(), stopped.tolist()
        out = []
        for i in range(len(prompts)):
            group = []
            for r in range(i * n, (i + 1) * n):
                m = lengths[r]
                group.append(Completion(tokens[r][:m], logprobs[r][:m], "stop" if stopped[r] else "length"))
            out.append(group)
        return out

    # ------------------------------------------------------------------ internals

    def _check(self, prompts, n, max_new_tokens, temperature, top_k, top_p, min_p, images) -> None:
        V = self.cfg.vocab_size
        image_id = self.cfg.vision.image_token_id if self.cfg.vision is not None else None
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts; give one per prompt "
                             "(None for a prompt without images)")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; start it with <bos> (id 2)")
            text = [t for t in p if t != image_id]
            if text and (min(text) < 0 or max(text) >= V):
                raise ValueError(f"prompt {i} holds token ids outside [0, {V}) (vocab_size {V})")
            if image_id is not None and len(text) < len(p) and (images is None or images[i] is None):
                raise ValueError(f"prompt {i} holds image tokens ({image_id}) but no images were given for it")
        rules = [
            (n >= 1, f"n ({n}) must be at least 1"),
            (max_new_tokens >= 1, f"max_new_tokens ({max_new_tokens}) must be at least 1"),
            (temperature >= 0, f"temperature ({temperature}) must be >= 0 (0 = greedy)"),
            (top_k is None or top_k >= 1, f"top_k ({top_k}) must be at least 1"),
            (top_p is None or 0 < top_p <= 1, f"top_p ({top_p}) must be in (0, 1]"),
            (min_p is None or 0 <= min_p <= 1, f"min_p ({min_p}) must be in [0, 1]"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, C) -> float32 (R, V), as the training forward computes them (a bf16 model's or bf16
        autocast's logits are not rounded to bf16: log-probs would be off by about 0.01 nats, and an RL
        step on them off-policy without knowing it). Laid out as W @ h^T: with a 262k-row weight and
        few rows of h, MKL runs this form up to 2x faster on CPU (bench/sampler.py)."""
        weight = self.weights.head()
        return _mm32(weight, hidden.to(weight.dtype).T).T

    def _linear(self, *modules: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, in) times each module's weight -> [(N, out_i)]: one packed oneDNN product on CPU, else F.linear."""
        if self._packed is not None:
            return self._packed.linear(modules, x)
        return [F.linear(x, self.weights(m)) for m in modules]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (N, C) -> float32 logits (N, V)."""
        if self._packed is not None:
            return self._linear(self.model.embed_tokens, x=hidden)[0]
        return self._logits(hidden)

    def _qkv(self, attn, h: torch.Tensor, positions: torch.Tensor):
        """h (B*T, C) normed inputs, positions (B, T) -> q (B, H, T, D), k and v (B, K, T, D).

        The same math as Attention.project_qkv (QK-norm, then RoPE), on flattened tokens so the
        projections can run on packed weights."""
        B, T = positions.shape
        H, K, D = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q, k, v = self._linear(attn.q_proj, attn.k_proj, attn.v_proj, x=h)
        q = q.reshape(B, T, H, D).transpose(1, 2)
        k = k.reshape(B, T, K, D).transpose(1, 2)
        v = v.reshape(B, T, K, D).transpose(1, 2)
        q = apply_rope(attn.q_norm(q), positions, attn.inv_freq)
        k = apply_rope(attn.k_norm(k), positions, attn.inv_freq)
        return q, k, v

    def _block_tail(self, block, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Everything in a block after attention, on flattened tokens: x (N, C), attn_out (N, H*D)."""
        mlp = block.mlp
        x = x + block.post_attention_layernorm(self._linear(block.self_attn.o_proj, x=attn_out)[0])
        gate, up = self._linear(mlp.gate_proj, mlp.up_proj, x=block.pre_feedforward_layernorm(x))
        gated = F.gelu(gate, approximate="tanh") * up
        return x + block.post_feedforward_layernorm(self._linear(mlp.down_proj, x=gated)[0])

    def _chunks(self, blocks: torch.Tensor | None, T: int) -> list[tuple[int, int]]:
        """Prefill chunks [s, e) of about prefill_chunk tokens; an image block is never split, so its
        tokens can attend to the whole image within one chunk."""
        out, s = [], 0
        while s < T:
            e = min(s + self.prefill_chunk, T)
            if blocks is not None and e < T and blocks[e - 1] >= 0:
                while e < T and blocks[e] == blocks[e - 1]:
                    e += 1
            out.append((s, e))
            s = e
        return out

    def _prefill(self, cache: KVCache, row: int, prompt: Sequence[int], device,
                 features: torch.Tensor | None = None) -> torch.Tensor:
        """Run one prompt into cache row `row`, chunk by chunk; returns the last position's logits (1, V).
        features (N, S, C): the prompt's projected images, written over its image tokens."""
        ids = torch.tensor(list(prompt), device=device)
        W, ring = self.cfg.sliding_window, cache.ring
        blocks = embedded = None
        if features is not None:
            blocks = image_blocks((ids == self.cfg.vision.image_token_id).long()[None])[0]  # (T,)
            embedded = self.model.embed_inputs(ids[None], image_features=features,
                                               weight=self.weights(self.model.embed_tokens))[0]  # (T, C)
        for s, e in self._chunks(blocks, ids.shape[0]):
            qpos = torch.arange(s, e, device=device)
            ring_pos = cache.slot_pos[row]  # (ring,) positions held before this chunk
            keep = qpos[-ring:]  # the chunk positions that stay in the ring afterwards
            x = self.model.embed(ids[s:e], self.weights(self.model.embed_tokens)) if embedded is None \
                else embedded[s:e]  # (Tc, C)
            same_image = None
            if blocks is not None:  # (Tc, Tc): the chunk's image tokens see their whole image
                qb = blocks[s:e]
                same_image = (qb[:, None] == qb[None, :]) & (qb[:, None] >= 0)
            for layer, block in enumerate(self.model.layers):
                attn = block.self_attn
                q, k, v = self._qkv(attn, block.input_layernorm(x), qpos[None])  # (1, H|K, Tc, D)
                if attn.is_global:
                    cache.k[layer][row, :, s:e] = k[0]
                    cache.v[layer][row, :, s:e] = v[0]
                    keys, vals = cache.k[layer][row:row + 1, :, :e], cache.v[layer][row:row + 1, :, :e]
                    kpos = torch.arange(e, device=device)
                    mask = kpos[None, :] <= qpos[:, None]
                    if same_image is not None:
                        mask[:, s:] |= same_image
                else:
                    # Attend to the ring as it was plus the chunk itself; a chunk longer than the
                    # ring would otherwise overwrite keys its own early queries still need.
                    keys = torch.cat([cache.k[layer][row:row + 1], k], dim=2)
                    vals = torch.cat([cache.v[layer][row:row + 1], v], dim=2)
                    kpos = torch.cat([ring_pos, qpos])
                    seen = kpos[None, :] <= qpos[:, None]
                    if same_image is not None:
                        seen[:, ring:] |= same_image
                    mask = seen & (kpos[None, :] > qpos[:, None] - W) & (kpos[None, :] >= 0)
                    cache.k[layer][row][:, keep % ring] = k[0, :, -len(keep):].to(cache.dtype)  # (K, n, D)
                    cache.v[layer][row][:, keep % ring] = v[0, :, -len(keep):].to(cache.dtype)
                y = _attend(q, keys, vals, mask[None, None], attn.scale)  # (1, H, Tc, D)
                x = self._block_tail(block, x, y.transpose(1, 2).reshape(e - s, -1))
            cache.slot_pos[row, keep % ring] = keep
        return self._head(self.model.norm(x[-1:]))

    def _decode_step(self, cache: KVCache, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token for every row: token (R,) at positions pos (R,) -> next-token logits (R, V)."""
        R = token.shape[0]
        rows = torch.arange(R, device=token.device)
        W, ring = self.cfg.sliding_window, cache.ring
        slot = pos % ring
        cache.slot_pos[rows, slot] = pos
        # Global layers read only the slots written so far (the static path reads all of them).
        used = cache.length if self.static else int(pos.max()) + 1
        kpos = torch.arange(used, device=token.device)
        global_mask = (kpos[None, :] <= pos[:, None])[:, None, None]  # (R, 1, 1, used)
        sp = cache.slot_pos
        sliding_mask = ((sp > (pos[:, None] - W)) & (sp >= 0))[:, None, None]  # (R, 1, 1, ring)
        x = self.model.embed(token, self.weights(self.model.embed_tokens))  # (R, C)
        for layer, block in enumerate(self.model.layers):
            attn = block.self_attn
            q, k, v = self._qkv(attn, block.input_layernorm(x), pos[:, None])  # (R, H|K, 1, D)
            at = pos if attn.is_global else slot
            cache.k[layer][rows, :, at] = k[:, :, 0].to(cache.dtype)
            cache.v[layer][rows, :, at] = v[:, :, 0].to(cache.dtype)
            if attn.is_global:
                y = _attend(q, cache.k[layer][:, :, :used], cache.v[layer][:, :, :used], global_mask, attn.scale)
            else:
                y = _attend(q, cache.k[layer], cache.v[layer], sliding_mask, attn.scale)
            x = self._block_tail(block, x, y.reshape(R, -1))
        return self._head(self.model.norm(x))
