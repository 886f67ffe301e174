"""Optimizer-in-backward: step each parameter as soon as its gradient is complete, then free it.

    from step_memory import OptimizerInBackward  # bench/: an experiment the benchmark measures, not library API

    make = lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True)
    oib = OptimizerInBackward(model.parameters(), make)
    for ids in batches:
        h = model.hidden_states(ids)
        chunked_cross_entropy(h[:, :-1], model.embed_tokens.weight, ids[:, 1:]).backward()  # updates all
    oib.remove()  # back to ordinary gradients

    # least memory: the tied head's gradient never exists whole (see "The tied head")
    model.embed_tokens.sparse = True
    oib = OptimizerInBackward(model.parameters(), make, tied_head=model.embed_tokens.weight)
    oib.cross_entropy(model.hidden_states(ids)[:, :-1], ids[:, 1:], chunk_tokens=128).backward()

A plain step holds every gradient at once at the end of backward (one parameter-sized copy of the
model: 1.07 GB for the 270M in float32) before `optimizer.step()` consumes them. Here each
parameter gets its own optimizer, stepped from a `register_post_accumulate_grad_hook`, and its
gradient is dropped right after, so only the gradients of the parameters in flight exist. A
parameter used twice in the graph (Gemma's embedding, tied to the output head) is stepped once:
the hook fires after all of its contributions of this backward have accumulated.

The tied head. Even so, the embedding's whole (V, C) gradient (671 MB on the 270M, float32) must
exist at the end of backward: the head's part is dense and the lookup's part arrives last. With
`tied_head=weight`, `oib.cross_entropy(hidden, targets)` gives the loss and the hidden states'
gradient but not the weight's; the weight's post-accumulate hook (after the lookup's gradient,
best sparse: `model.embed_tokens.sparse = True`) then computes the head's gradient block of
`head_block_rows` vocabulary rows at a time from the saved hidden states (log-sum-exp per token
recovered from log p(target), so no extra pass), adds the lookup's rows, and steps that block with
its own optimizer (on a view of the weight) before the next: no (V, C) gradient and no
(tokens, V) logits ever exist. Cost: one more head GEMM (each block's logits are recomputed), 4
instead of 3 for the head per step; on the 270M at 1 x 1024 tokens, float32, 2 CPU threads, with
activation checkpointing and 128-token loss chunks, 4.1 GB peak RSS against 5.7 GB without it
and 8.1 GB for transformers, at 0.72x transformers' speed (bench/train_step.py). Blocks of
16384 rows keep each block's optimizer state above glibc's 32 MiB mmap threshold, so it never
fragments the heap (4096-row blocks cost 0.5 GB more peak RSS there).

The update is exactly the wrapped optimizer's for element-wise optimizers (SGD, Adam, AdamW: a
per-parameter or per-block optimizer does the same arithmetic), not for ones that couple elements
across a tensor or across parameters (LAMB, Adafactor's factored moments, Shampoo). By
construction it rules out:
- clipping by the global gradient norm (the norm is known only after the updates);
- gradient accumulation over micro-batches, unless stepping is paused: inside
  `with oib.accumulating():` backward only accumulates (`.grad`, and pending head terms); the next
  backward outside it adds its own and steps on the sum;
- reading `.grad` after backward (it is None), and ZeRO/DeepSpeed, which own the step themselves.
Learning-rate schedules go through `set_lr`, which sets every optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from posttrain.losses import chunked_cross_entropy


class _Tap(torch.autograd.Function):
    """Identity on a scalar loss that records d(final)/d(loss) in `record` during backward."""

    @staticmethod
    def forward(ctx, loss, record):
        ctx.record = record
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.record["grad"] = grad.detach()
        return grad, None


class OptimizerInBackward:
    """One `make_optimizer([tensor])` per trainable parameter, stepped in backward (module docstring).

    params: the parameters to train (duplicates and requires_grad=False ones are skipped).
    make_optimizer: builds an optimizer for a list of one tensor, e.g.
        lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True)
    tied_head: the (V, C) weight shared by the embedding and the output head, or None. When given,
        train it only through `cross_entropy` below; it gets one optimizer per block of
        `head_block_rows` rows (views of the weight) instead of one for the whole.
    """

    def __init__(self, params: Iterable[nn.Parameter],
                 make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer], *,
                 tied_head: nn.Parameter | None = None, head_block_rows: int = 16384):
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._handles = []
        self.stepping = True
        self.steps = 0  # parameter (or head block) updates done: for tests and logging
        self.tied_head = tied_head
        self._pending: list[dict] = []  # per cross_entropy call: hidden, targets, log p(target), grad
        self._head_blocks: list[tuple[int, torch.Tensor, torch.optim.Optimizer]] = []
        if tied_head is not None:
            if tied_head.dim() != 2 or not tied_head.requires_grad:
                raise ValueError("tied_head must be a (V, C) parameter that requires grad")
            for start in range(0, tied_head.shape[0], head_block_rows):
                view = tied_head.detach()[start:start + head_block_rows]  # shares the weight's storage
                self.optimizers[view] = make_optimizer([view])
                self._head_blocks.append((start, view, self.optimizers[view]))
            self._handles.append(tied_head.register_post_accumulate_grad_hook(self._step_head))
        for p in params:
            if not p.requires_grad or p is tied_head or p in self.optimizers:
                continue
            self.optimizers[p] = make_optimizer([p])
            self._handles.append(p.register_post_accumulate_grad_hook(self._step))

    def _step(self, p: nn.Parameter) -> None:
        if not self.stepping:
            return
        self.optimizers[p].step()
        p.grad = None
        self.steps += 1

    def cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                      chunk_tokens: int = 1024, normalizer=None) -> torch.Tensor:
        """`chunked_cross_entropy(hidden, tied_head, targets, mask, chunk_tokens, normalizer)`, whose
        head-weight gradient is computed and applied block by block when the weight's hook fires."""
        if self.tied_head is None:
            raise ValueError("cross_entropy needs OptimizerInBackward(..., tied_head=weight)")
        C = hidden.shape[-1]
        h, t = hidden.reshape(-1, C), targets.reshape(-1)
        if mask is not None:
            keep = mask.reshape(-1).nonzero().squeeze(1)
            h, t = h.index_select(0, keep), t.index_select(0, keep)
        n = max(h.shape[0], 1) if normalizer is None else normalizer
        loss, logp = chunked_cross_entropy(h, self.tied_head.detach(), t, chunk_tokens=chunk_tokens,
                                           normalizer=n, return_logprobs=True)
        if not (torch.is_grad_enabled() and loss.requires_grad):
            return loss
        record = {"hidden": h.detach(), "targets": t.long(), "logp": logp, "normalizer": n}
        self._pending.append(record)
        return _Tap.apply(loss, record)

    @torch.no_grad()
    def _step_head(self, weight: nn.Parameter) -> None:
        if not self.stepping:
            return
        lookup = weight.grad  # the embedding lookup's gradient: sparse, dense or None
        weight.grad = None
        if lookup is not None and lookup.is_sparse:
            lookup = lookup.coalesce()
        terms = []
        for rec in self._pending:
            if "grad" not in rec:  # a loss that was never backpropagated
                continue
            h, t = rec["hidden"], rec["targets"]
            w = h.to(torch.promote_types(weight.dtype, torch.float32))
            # log-sum-exp per token from log p(target) = z_target - lse, with the weight before any update
            lse = (w * weight[t].to(w.dtype)).sum(-1) - rec["logp"]
            scale = rec["grad"].to(w.dtype) / rec["normalizer"]
            terms.append((w, t, lse, scale))
        self._pending.clear()
        for start, view, opt in self._head_blocks:
            end = start + view.shape[0]
            grad = torch.zeros(view.shape, dtype=torch.promote_types(view.dtype, torch.float32), device=view.device)
            for w, t, lse, scale in terms:
                p = torch.mm(w, view.to(w.dtype).T).sub_(lse[:, None]).exp_().mul_(scale)  # softmax * scale (N, rows)
                inside = ((t >= start) & (t < end)).nonzero().squeeze(1)
                p[inside, t[inside] - start] -= scale  # minus the one-hot target
                grad.addmm_(p.T, w)
                del p
            if lookup is not None:
                if lookup.is_sparse:
                    idx, vals = lookup.indices()[0], lookup.values()
                    sel = ((idx >= start) & (idx < end)).nonzero().squeeze(1)
                    grad.index_add_(0, idx[sel] - start, vals[sel].to(grad.dtype))
                else:
                    grad += lookup[start:end]
            view.grad = grad.to(view.dtype)
            opt.step()
            view.grad = None
            self.steps += 1

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside only accumulate; the first one after steps on the sum."""
        self.stepping = False
        try:
            yield
        finally:
            self.stepping = True

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> list[dict]:
        """Optimizer states in a fixed order (head blocks first, then the parameters as given)."""
        return [opt.state_dict() for opt in self.optimizers.values()]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"{len(states)} optimizer states for {len(self.optimizers)} optimizers")
        for opt, state in zip(self.optimizers.values(), states):
            opt.load_state_dict(state)

    def remove(self) -> None:
        """Unregister the hooks: later backward passes leave ordinary `.grad`s again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


__all__ = ["OptimizerInBackward"]
