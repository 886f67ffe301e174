"""Vocabulary losses from final hidden states, in chunks of tokens: N x V logits never exist.

    loss = chunked_cross_entropy(hidden, model.embed_tokens.weight, targets, mask)

Every loss takes final-normed hidden states (N, C) (any leading shape), the tied head weight
(V, C), per-token inputs and a `mask` (N,) of the tokens it covers (None: all); it returns the
sum over covered tokens / `normalizer` (default: their number), so callers can divide by a
global token count across ranks and micro-batches. Uncovered tokens (prompts) never reach the head.

How: one autograd Function, `_ChunkedHead`, and a "kernel" per loss. Each chunk of n tokens gets
float32 logits z = h @ W.T (n, V); the kernel gives per-token values and dvalue/dz; then
grad_hidden[chunk] = dz @ W and grad_weight += dz.T @ h. Cost, for N covered tokens:
- Memory: O(n x V), never O(N x V): 2 live (n, V) float32 buffers for cross-entropy and the
  distillation losses, up to 5 for KL to a reference (n*V*4 bytes is 1 GiB at n=1024, V=262k),
  plus a float32 (V, C) grad_weight accumulator (the gradient's size anyway) and, when W is not
  float32 (bf16 on CPU), a float32 copy of W while a pass runs.
- Compute, fused (the default for scalar losses while grad is enabled): the gradients are
  computed in the forward pass and backward only scales them by d(outer)/d(loss), so the head
  costs 3 GEMMs of 2*N*V*C FLOPs, as the naive path does; grad_hidden (N, C) and grad_weight
  (V, C, float32) are held from forward to backward. `fused=False` saves only hidden, weight and
  the per-token inputs and recomputes each chunk's logits in backward: 4 GEMMs, +33% head FLOPs
  (on the 270M, whose 262k x 640 head dominates, about +20% of a training step), nothing held.
  Per-token outputs (`sequence_logprobs`) always recompute: their gradient weights are known
  only in backward. `weighted_logprobs` takes them before the forward (a loss linear in the
  log-probs, such as the RL losses) and is fused. KL to a reference adds one reference-logits
  GEMM per pass.
- Precision: softmax, losses and accumulation in float32 (float64 inputs stay float64, for
  gradcheck). On CUDA, bf16/fp16 operands stay low precision in the GEMMs, with float32
  accumulation and output (`torch.mm(..., out_dtype=torch.float32)`, torch >= 2.8).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import torch
from torch.autograd.function import once_differentiable

# ---------------------------------------------------------------- GEMMs at float32 output


def _gemm_operand(weight: torch.Tensor) -> torch.Tensor:
    """The head weight as the GEMMs use it: low precision on CUDA (a float32 weight under CUDA
    autocast is cast once per call, as autocast would cast it per GEMM), else float32 (or float64)."""
    if weight.is_cuda and _mm_out_dtype_ok():
        if weight.dtype in (torch.bfloat16, torch.float16):
            return weight
        if weight.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            low = torch.get_autocast_dtype("cuda")
            if low in (torch.bfloat16, torch.float16):
                return weight.to(low)
    return weight.to(torch.promote_types(weight.dtype, torch.float32))


@functools.cache
def _mm_out_dtype_ok() -> bool:
    try:  # fp32 output from bf16 operands with fp32 accumulation; absent before torch 2.8
        a = torch.ones(1, 1, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 (or float64) result; a must already have b's dtype. Autocast off: it
    would run float32 operands in bf16 and round the logits."""
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype in (torch.float32, torch.float64):
            return a @ b
        return torch.mm(a, b, out_dtype=torch.float32)


def _addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32 (or float64): in place, no (V, C) temporary, when a is too."""
    if a.dtype == acc.dtype:
        with torch.autocast(a.device.type, enabled=False):
            acc.addmm_(a, b)
    else:
        acc += _mm32(a, b)


# ---------------------------------------------------------------- kernels
# A kernel maps one chunk's float32 logits z (n, V) and the chunk's per-token inputs to
# per-token values (n,) and, when grad=True, dvalues/dz (n, V). torch.log_softmax, not
# z - logsumexp(z): it shifts by the max first, which is ~3x more accurate in float32.


def _soft_ce(z: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, grad: bool):
    """-sum_k q_k log softmax(z)[ids_k] for ids (n, K) long, weights q (n, K).

    q need not sum to 1 and ids may repeat (each pair counts). Gradient:
    softmax(z) * sum_k q_k - scatter_add(ids, q). Cross-entropy is K=1, q=1.
    """
    ls = torch.log_softmax(z, -1)
    value = -(q * ls.gather(1, ids)).sum(-1)
    if not grad:
        return value, None
    dz = ls.exp_().mul_(q.sum(-1, keepdim=True))  # softmax * sum q, in place
    return value, dz.scatter_add_(1, ids, -q)  # scatter_add: repeated ids accumulate


def _kl(z: torch.Tensor, ref_hidden: torch.Tensor, grad: bool, *, ref_w: torch.Tensor, reverse: bool):
    """Full-vocabulary KL per token against reference logits ref_hidden @ ref_w.T (no grad).

    reverse: KL(s || r) = sum_v s_v (log s_v - log r_v); d/dz = s * (log s - log r - KL).
    forward: KL(r || s) = sum_v r_v (log r_v - log s_v); d/dz = s - r.
    """
    ls = torch.log_softmax(z, -1)  # log s
    lr = torch.log_softmax(_mm32(ref_hidden.to(ref_w.dtype), ref_w.T), -1).to(z.dtype)  # log r
    if reverse:
        s = ls.exp()
        f = lr.neg_().add_(ls)  # log s - log r
        value = (s * f).sum(-1)
        return value, (f.sub_(value[:, None]).mul_(s) if grad else None)
    r = lr.exp()
    value = (r * lr.sub_(ls)).sum(-1)  # lr becomes log r - log s, in place
    return value, (ls.exp_().sub_(r) if grad else None)


# ---------------------------------------------------------------- the chunked Function


def _head_pass(hidden, weight, kernel, chunk, rows, scale, need_h, need_w):
    """Per-token values (N,) and, unless `scale` is None, the gradients of sum(scale * values);
    scale is a tensor (N,) or the number 1."""
    w = _gemm_operand(weight)
    values = torch.empty(hidden.shape[0], dtype=torch.promote_types(w.dtype, torch.float32),
                         device=hidden.device)
    grad_h = torch.zeros_like(hidden) if scale is not None and need_h else None
    grad_w = torch.zeros(weight.shape, dtype=values.dtype, device=weight.device) \
        if scale is not None and need_w else None
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk].to(w.dtype)  # (n, C)
        value, dz = kernel(_mm32(h, w.T), *(r[s:s + chunk] for r in rows), grad=scale is not None)
        values[s:s + chunk] = value
        if scale is None:
            continue
        if torch.is_tensor(scale):
            dz.mul_(scale[s:s + chunk, None])
        dz = dz.to(w.dtype)  # (n, V); rounded only for bf16 GEMMs
        if grad_h is not None:
            grad_h[s:s + chunk] = _mm32(dz, w)  # (n, V) @ (V, C)
        if grad_w is not None:
            _addmm32_(grad_w, dz.T, h)  # (V, n) @ (n, C)
        del dz  # before the next chunk's logits exist: 2 live (n, V) buffers, not 3
    return values, grad_h, grad_w


class _ChunkedHead(torch.autograd.Function):
    """kernel(hidden @ weight.T) row by row, in chunks of `chunk` tokens (module docstring).

    fused=False: returns per-token values (N,); backward recomputes each chunk's logits.
    fused=True: returns (sum of scale * values, values without grad) and computes the gradients
    of that sum in the same pass; backward only scales them. Use it only when a backward can come.
    scale: per-token weights (N,) without grad, or None for 1 (fused only).
    """

    @staticmethod
    def forward(ctx, hidden, weight, kernel, chunk, fused, scale, *rows):
        if scale is not None and not fused:
            raise ValueError("a per-token scale needs fused=True (the unfused output is per token)")
        ctx.fused, ctx.n_rows, ctx.kernel, ctx.chunk, ctx.scale = fused, len(rows), kernel, chunk, scale
        ctx.save_for_backward(hidden, weight, *rows)  # fused: only for a second backward (retain_graph)
        if not fused:
            return _head_pass(hidden, weight, kernel, chunk, rows, None, False, False)[0]
        values, ctx.grad_h, ctx.grad_w = _head_pass(hidden, weight, kernel, chunk, rows,
                                                    1 if scale is None else scale, *ctx.needs_input_grad[:2])
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(values)
        return (values.sum() if scale is None else (values * scale).sum()), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        if ctx.fused and not getattr(ctx, "released", False):  # grad_out is a scalar: d(outer)/d(sum)
            # Hand the held gradients over, scaled in place, and drop the node's references:
            # returning copies while the node still holds the originals would keep a second (V, C)
            # buffer alive. A second backward through this node (retain_graph) recomputes below.
            gh, gw, ctx.grad_h, ctx.grad_w, ctx.released = ctx.grad_h, ctx.grad_w, None, None, True
            gh = None if gh is None else gh.mul_(grad_out)
            gw = None if gw is None else gw.mul_(grad_out).to(ctx.weight_dtype)
        else:
            hidden, weight, *rows = ctx.saved_tensors
            if ctx.fused:  # the output was the (scaled) sum: every token gets the outer scale
                grad_out = grad_out.expand(hidden.shape[0])
                grad_out = grad_out if ctx.scale is None else grad_out * ctx.scale
            _, gh, gw = _head_pass(hidden, weight, ctx.kernel, ctx.chunk, rows, grad_out,
                                   *ctx.needs_input_grad[:2])
            gw = None if gw is None else gw.to(weight.dtype)
        return (gh, gw, None, None, None, None) + (None,) * ctx.n_rows


# ---------------------------------------------------------------- plumbing


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _covered(hidden, weight, mask, *per_token):
    """Flatten to (N, C), (N, ...) and keep the rows where mask is True: (idx or None, hidden, rows)."""
    lead, C = hidden.shape[:-1], hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != C:
        raise ValueError(f"weight must be (V, C) with C = hidden's last dim ({C}); got {tuple(weight.shape)}")
    for t in (*per_token, *(() if mask is None else (mask,))):
        if t.shape[:len(lead)] != lead:
            raise ValueError(f"per-token inputs and mask must start with hidden's leading shape "
                             f"{tuple(lead)}; got {tuple(t.shape)}")
    hidden = hidden.reshape(-1, C)
    per_token = [t.reshape(hidden.shape[0], *t.shape[len(lead):]) for t in per_token]
    if mask is None:
        return None, hidden, per_token
    idx = mask.reshape(-1).nonzero().squeeze(1)
    return idx, hidden.index_select(0, idx), [t.index_select(0, idx) for t in per_token]


def _spread(values: torch.Tensor, idx, lead: torch.Size) -> torch.Tensor:
    """Covered-row values back to the leading shape, 0 at uncovered tokens."""
    if idx is not None:
        values = values.new_zeros(lead.numel()).index_copy(0, idx, values)
    return values.reshape(lead)


def _norm(covered: int, normalizer):
    return max(covered, 1) if normalizer is None else normalizer


def _reduced(hidden, weight, kernel, rows, chunk, normalizer, fused):
    """(sum of per-token values / normalizer, per-token values without grad) over the given rows."""
    if fused and torch.is_grad_enabled():
        total, values = _ChunkedHead.apply(hidden, weight, kernel, chunk, True, None, *rows)
    else:
        values = _ChunkedHead.apply(hidden, weight, kernel, chunk, False, None, *rows)
        total, values = values.sum(), values.detach()
    return total / _norm(hidden.shape[0], normalizer), values


# ---------------------------------------------------------------- losses


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, chunk_tokens: int = 1024, normalizer=None,
                          *, return_logprobs: bool = False, fused: bool = True):
    """Next-token cross-entropy: sum over covered tokens of -log softmax(W h)[target] / normalizer.

    hidden (..., C), weight (V, C), targets (...) int (already shifted), mask (...) bool or None.
    Returns the scalar loss; with return_logprobs also log p(target) (...) without grad (0 at
    uncovered tokens), for metrics and RL.
    """
    idx, h, (t,) = _covered(hidden, weight, mask, targets)
    t = t.long()[:, None]  # (n, 1)
    ones = torch.ones(t.shape, dtype=_acc_dtype(weight), device=t.device)
    loss, values = _reduced(h, weight, _soft_ce, (t, ones), chunk_tokens, normalizer, fused)
    return (loss, _spread(-values, idx, hidden.shape[:-1])) if return_logprobs else loss


def chunked_sampled_distillation(hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                                 teacher_probs: torch.Tensor, mask: torch.Tensor | None = None,
                                 chunk_tokens: int = 1024, normalizer=None, *, fused: bool = True):
    """The Gemma 3 report's distillation: cross-entropy to the teacher restricted to sampled ids.

    teacher_ids (..., K) int and teacher_probs (..., K) float, as sample_teacher_targets makes
    them. Per token, with q_k = p_k / sum_j p_j (zero off the sampled ids, renormalised) and the
    student's log-probs normalised over the full vocabulary:
        loss = -sum_k q_k log softmax(W h)[id_k]
    Pairs are used as given: sample_teacher_targets never repeats an id (it samples without
    replacement). Samples drawn with replacement may be passed as (id, count) pairs instead,
    which gives the unbiased empirical target. A token whose probs are all 0 contributes 0.
    """
    _, h, (ids, p) = _covered(hidden, weight, mask, teacher_ids, teacher_probs)
    p = p.to(_acc_dtype(weight))
    q = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return _reduced(h, weight, _soft_ce, (ids.long(), q), chunk_tokens, normalizer, fused)[0]


def chunked_topk_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, mask: torch.Tensor | None = None,
                    chunk_tokens: int = 1024, normalizer=None, *, fused: bool = True):
    """Top-k forward KL(teacher || student), restricted to the teacher's top-k ids.

    teacher_ids (..., k) int, teacher_logprobs (..., k) (topk_teacher_targets' output; any
    offset). Per token, t = softmax(teacher_logprobs) renormalises the teacher over its top k
    and log s = log_softmax(W h) is normalised over the full vocabulary:
        loss = sum_k t_k (log t_k - log s[id_k])
    The constant sum_k t_k log t_k (no gradient) is kept so the value is a divergence: it equals
    KL(t || s restricted to the k ids and renormalised) - log(student mass on the k ids) >= 0,
    is 0 only when the student equals t, and is the full KL(teacher || student) at k = V.
    """
    _, h, (ids, lt) = _covered(hidden, weight, mask, teacher_ids, teacher_logprobs)
    log_t = lt.to(_acc_dtype(weight)).log_softmax(-1)
    t = log_t.exp()
    loss, _ = _reduced(h, weight, _soft_ce, (ids.long(), t), chunk_tokens, normalizer, fused)
    return loss + torch.xlogy(t, t).sum() / _norm(h.shape[0], normalizer)  # xlogy: 0 log 0 = 0


def chunked_kl_to_reference(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                            ref_weight: torch.Tensor, mask: torch.Tensor | None = None,
                            direction: Literal["reverse", "forward"] = "reverse", chunk_tokens: int = 1024,
                            normalizer=None, *, fused: bool = True):
    """Full-vocabulary KL per token between the student W h and a frozen reference W_r h_r.

    direction "reverse": KL(student || reference), the RL penalty toward an anchor/reference;
    "forward": KL(reference || student), distillation's forward KL. ref_hidden (..., C_r) and
    ref_weight (V, C_r) get no gradient (the reference may be a different width).
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' (KL(student||ref)) or 'forward' (KL(ref||student)); "
                         f"got {direction!r}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"student and reference vocabularies differ: {weight.shape[0]} vs {ref_weight.shape[0]}")
    _, h, (rh,) = _covered(hidden, weight, mask, ref_hidden.detach())
    kernel = functools.partial(_kl, ref_w=_gemm_operand(ref_weight.detach()), reverse=direction == "reverse")
    return _reduced(h, weight, kernel, (rh,), chunk_tokens, normalizer, fused)[0]


class DistillMetrics(NamedTuple):
    kl: torch.Tensor  # mean over covered tokens of the full-vocab KL(teacher || student)
    top1: torch.Tensor  # fraction of covered tokens where the student's argmax is the teacher's
    tokens: int  # covered tokens: the weight for averaging across ranks
    label_top1: torch.Tensor | None = None  # fraction where the student's argmax is the data's own token


@torch.no_grad()
def distill_metrics(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, mask: torch.Tensor | None = None,
                    chunk_tokens: int = 1024, labels: torch.Tensor | None = None) -> DistillMetrics:
    """Teacher-student KL and top-1 agreement, chunk by chunk (shapes as chunked_kl_to_reference);
    with labels (the covered tokens' own next tokens, (n,)), also the student's top-1 accuracy on them."""
    _, h, (th,) = _covered(student_hidden, student_weight, mask, teacher_hidden)
    sw, tw = _gemm_operand(student_weight), _gemm_operand(teacher_weight)
    kl = agree = right = torch.zeros((), dtype=torch.float64, device=h.device)
    for s in range(0, h.shape[0], chunk_tokens):
        ls = torch.log_softmax(_mm32(h[s:s + chunk_tokens].to(sw.dtype), sw.T), -1)  # (n, V)
        lt = torch.log_softmax(_mm32(th[s:s + chunk_tokens].to(tw.dtype), tw.T), -1)
        agree = agree + (ls.argmax(-1) == lt.argmax(-1)).sum()
        if labels is not None:
            right = right + (ls.argmax(-1) == labels[s:s + chunk_tokens]).sum()
        kl = kl + (lt.exp() * lt.sub_(ls)).sum()  # exp first, then lt becomes log t - log s in place
    n = max(h.shape[0], 1)
    return DistillMetrics((kl / n).float(), (agree / n).float(), h.shape[0],
                          None if labels is None else (right / n).float())


# ---------------------------------------------------------------- teacher targets


@torch.no_grad()
def sample_teacher_targets(teacher_logits: torch.Tensor, k: int = 256, temperature: float = 1.0,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct ids per token drawn from the teacher distribution, and the teacher's probs there.

    teacher_logits (n, V) -> ids (n, k) int32, probs (n, k) float16: what the on-disk cache stores.
    probs are the teacher probabilities softmax(logits / temperature) at the ids, not counts and
    not renormalised (their sum is the mass covered; the loss renormalises). Sampling without
    replacement by Gumbel-top-k (top k of log p + Gumbel noise), which draws ids one at a time in
    proportion to p among those not yet drawn; k = V returns every id. Probs under float16's
    smallest subnormal (6e-8) become 0 and then carry no weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0; use topk_teacher_targets for greedy targets")
    logp = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (n, V)
    # E ~ Exp(1) and -log E ~ Gumbel; the clamp keeps a (2^-53-rare on CPU) E = 0 from forcing an id in
    keys = torch.empty_like(logp).exponential_(generator=generator).clamp_min_(1e-30).log_().neg_().add_(logp)
    ids = keys.topk(k, -1).indices
    return ids.int(), logp.gather(-1, ids).exp().half()


@torch.no_grad()
def topk_teacher_targets(teacher_logits: torch.Tensor, k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k likeliest ids (n, k) int32 and their full-vocab log-probs (n, k) float32."""
    logprobs, ids = torch.log_softmax(teacher_logits.float(), -1).topk(k, -1)
    return ids.int(), logprobs


@torch.no_grad()
def teacher_targets(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, k: int = 256,
                    method: Literal["sample", "topk"] = "sample", chunk_tokens: int = 1024,
                    **sample_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for teacher hidden states (N, C), chunk by chunk: never N x V.

    "sample": (ids, probs) as sample_teacher_targets (kwargs: temperature, generator);
    "topk": (ids, logprobs) as topk_teacher_targets.
    """
    if method not in ("sample", "topk"):
        raise ValueError(f"method must be 'sample' (the report's 256 sampled ids) or 'topk'; got {method!r}")
    tw = _gemm_operand(teacher_weight)
    fn = functools.partial(sample_teacher_targets, k=k, **sample_kwargs) if method == "sample" \
        else functools.partial(topk_teacher_targets, k=k)
    parts = [fn(_mm32(teacher_hidden[s:s + chunk_tokens].to(tw.dtype), tw.T))
             for s in range(0, teacher_hidden.shape[0], chunk_tokens)]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


# ---------------------------------------------------------------- policy gradient (see also pg.py)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """log softmax(W h)[target] per token WITH gradient, never N x V.

    hidden (..., C), targets (...) int -> (...) float32, 0 where mask is False. Sum over a
    sequence's sampled tokens for log pi(y). Backward recomputes each chunk's logits.
    """
    idx, h, (t,) = _covered(hidden, weight, mask, targets)
    t = t.long()[:, None]  # (n, 1)
    ones = torch.ones(t.shape, dtype=_acc_dtype(weight), device=t.device)
    values = _ChunkedHead.apply(h, weight, _soft_ce, chunk_tokens, False, None, t, ones)  # -log p
    return _spread(-values, idx, hidden.shape[:-1])


def weighted_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      token_weights: torch.Tensor, mask: torch.Tensor | None = None,
                      chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over covered tokens of token_weights * log softmax(W h)[target], WITH gradient;
    log softmax(W h)[target] per token, without), never N x V.

    For a loss linear in the log-probs whose coefficients are known before the forward (the RL
    losses: rl.linear_loss_step): the same gradient as (token_weights * sequence_logprobs(...)).sum(),
    computed fused in the forward pass, so the head costs 3 GEMMs instead of 4 (module docstring).
    token_weights (...) like targets, without grad; per-token log-probs are 0 where mask is False.
    """
    idx, h, (t, tw) = _covered(hidden, weight, mask, targets, token_weights)
    t = t.long()[:, None]  # (n, 1)
    acc = _acc_dtype(weight)
    ones = torch.ones(t.shape, dtype=acc, device=t.device)
    scale = -tw.detach().to(acc)  # the values are -log p
    if torch.is_grad_enabled():
        total, values = _ChunkedHead.apply(h, weight, _soft_ce, chunk_tokens, True, scale, t, ones)
    else:
        values = _ChunkedHead.apply(h, weight, _soft_ce, chunk_tokens, False, None, t, ones)
        total = (values * scale).sum()
    return total, _spread(-values.detach(), idx, hidden.shape[:-1])
