"""Ulysses sequence parallelism: one sequence split over N ranks along T (arXiv:2309.14509).

Each rank of a sequence-parallel (SP) group of N ranks holds a contiguous 1/N of every row's tokens
and runs everything but attention on its shard alone (embedding, MLP, norms, RoPE with each
token's own position, the head and the loss). Attention needs every key, so DeepSpeed's
`DistributedAttention` all-to-alls q, k, v from "my T/N tokens, all H heads" to "all T tokens,
H/N heads", runs our `model.causal_attention` on the full sequence for those heads, and
all-to-alls the output back:

    q (B, H, T/N, D), k/v (B, K, T/N, D)  --all-to-all-->  q (B, H/N, T, D), k/v (B, K'/N, T, D)
    causal_attention over the full T (sliding window, packed segments, image blocks as usual)
    out (B, H/N, T, D)  --all-to-all-->  (B, H, T/N, D)

Masks: after the exchange a rank sees the whole sequence, so it needs the FULL (B, T) segments and
image blocks. `shard()` therefore slices ids, positions, labels and loss masks but leaves
`segments` and `token_type_ids` whole; `Gemma3.hidden_states` hands both on, unsliced, to every
layer. Positions are sliced with their tokens, so RoPE needs no change.

GQA: heads are split in contiguous blocks, H/N query heads and K'/N key/value heads a rank, so
query head h still meets kv head h // (H / K'). With fewer kv heads than ranks (the 270M and 1B
have K = 1) each kv head is repeated (repeat_interleave) to K' = lcm(K, N) before the exchange.
H must be divisible by N.

Loss: `token_mean()` divides a shard's summed token losses by the token count of the whole
sequence (all-reduced over the group), so the shard losses of a group sum to the single-rank mean,
and summing each parameter's gradient over the group (what a data-parallel all-reduce does) gives
the single-rank gradient. Labels must be shifted over the full row before sharding.

    group = sequence_parallel.new_group(2)          # every rank calls it; contiguous ranks [0, 1], [2, 3], ...
    sequence_parallel.apply(model, group)
    part = sequence_parallel.shard({"ids": ids, "positions": pos, "segments": seg, "labels": labels}, group)
    logits = model(part["ids"], part["positions"], part["segments"])      # (B, T/N, V)
    loss = sequence_parallel.token_mean(token_losses, part["labels"] >= 0, group)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError
from .loader import IGNORE
from .model import Gemma3, causal_attention

# (B, T) inputs that stay whole on every rank: attention masks the full sequence after the exchange.
FULL_KEYS = ("segments", "token_type_ids")


def new_group(size: int) -> dist.ProcessGroup | None:
    """This rank's SP group: ranks [0, size), [size, 2 size), ... Every rank must call it (collective).
    None when size is 1 (no sequence parallelism; then no process group is needed)."""
    if size == 1:
        return None
    world = dist.get_world_size()
    if size < 1 or world % size:
        raise ValueError(f"distributed.sequence_parallel ({size}) must divide the world size ({world}); "
                         "fix: set it to a divisor, e.g. 1 or 2 on 2 ranks")
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine


def size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def shard(batch: dict[str, Any], group: dist.ProcessGroup | None, keep_full: tuple[str, ...] = FULL_KEYS,
          length_key: str = "ids") -> dict[str, Any]:
    """This rank's contiguous 1/N of every (B, T, ...) tensor along T; `keep_full` keys (segments,
    token_type_ids) and everything that is not a (B, T, ...) tensor are passed on unchanged.
    T is batch[length_key].shape[1] and must be divisible by N."""
    n = size(group)
    if n == 1:
        return dict(batch)
    T = batch[length_key].shape[1]
    if T % n:
        raise ValueError(f"sequence parallelism over {n} ranks needs the sequence length ({T}, "
                         f"'{length_key}' dim 1) divisible by {n}; fix: pad the batch to a multiple of {n} "
                         f"(e.g. data.max_seq_len a multiple of distributed.sequence_parallel)")
    r, step = dist.get_rank(group), T // n
    out = {}
    for key, value in batch.items():
        along_t = isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == T
        out[key] = value[:, r * step:(r + 1) * step] if along_t and key not in keep_full else value
    return out


def gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """The shards of `x` from every rank of the group, concatenated along `dim` (no gradient)."""
    if size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def token_mean(losses: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of this shard's token losses (at `mask`) over the token count of the whole sequence: the
    group's values sum to the single-rank mean. losses and mask share a shape, e.g. (B, T/N)."""
    count = mask.sum().to(torch.float64)
    if size(group) > 1:
        dist.all_reduce(count, group=group)
    return (losses * mask).sum() / count.clamp_min(1).to(losses.dtype)


def kv_repeat(num_heads: int, num_kv_heads: int, n: int) -> int:
    """How often each kv head is repeated so the kv heads split evenly over n ranks (1: not at all)."""
    if num_heads % n:
        raise ValueError(f"sequence parallelism over {n} ranks needs the query heads ({num_heads}) divisible "
                         f"by {n}; fix: set distributed.sequence_parallel to a divisor of {num_heads}")
    return math.lcm(num_kv_heads, n) // num_kv_heads  # lcm divides H: H % K == 0 and H % n == 0


class UlyssesAttention:
    """A drop-in for causal_attention on a sequence shard: (B, H, T/N, D), (B, K, T/N, D) -> (B, H, T/N, D).
    A plain object, not an nn.Module, so it adds nothing to the model's modules or state dict."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int, num_kv_heads: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.group, self.repeat = group, kv_repeat(num_heads, num_kv_heads, size(group))
        # batch-first (B, T, heads, D): scatter the heads (dim 2), gather the sequence (dim 1)
        self.exchange = DistributedAttention(_local_attention, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None,
                 segments: torch.Tensor | None, blocks: torch.Tensor | None = None) -> torch.Tensor:
        if self.repeat > 1:  # kv head j -> j * r .. j * r + r - 1: query head h still meets h // (H / K')
            k, v = k.repeat_interleave(self.repeat, dim=1), v.repeat_interleave(self.repeat, dim=1)
        out = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None,
                            scale=scale, window=window, segments=segments, blocks=blocks)
        return out.transpose(1, 2)


def _local_attention(q, k, v, *, scale, window, segments, blocks):
    """causal_attention on (B, T, heads, D) tensors holding the full sequence for this rank's heads."""
    out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                           window=window, segments=segments, blocks=blocks)
    return out.transpose(1, 2)


# Trained stages whose data path shards its batches (run_distill: data-parallel rows, shard_batch, shard
# targets), and those that do not yet.
SHARDED_STAGES = ("distill",)
UNSHARDED_STAGES = ("warm", "policy", "qat")


def check_trainable(cfg, trained: list[str] | None = None) -> None:
    """Raise UserError if distributed.sequence_parallel > 1 would reach a stage that does not shard its
    batches. trained: what is about to train (default: the trained stages among cfg.stages)."""
    n = cfg.distributed.sequence_parallel
    trained = [s for s in cfg.stages if s in UNSHARDED_STAGES] if trained is None else trained
    if n > 1 and trained:
        raise UserError(f"distributed.sequence_parallel={n} (Ulysses) is supported by the distill stage only, "
                        f"not yet by {', '.join(trained)}; fix: set distributed.sequence_parallel=1 for "
                        "this run, or train only the distill stage with it (stages=[distill, export])")


def check_distill(cfg, section, stage: str, has_images: bool) -> None:
    """Raise UserError for distill settings the sharded data path does not cover yet (sequence_parallel > 1)."""
    n = cfg.distributed.sequence_parallel
    if n == 1:
        return
    refused = [(section.method == "on_policy", f"{stage}.method=on_policy", f"{stage}.method=sampled or topk"),
               (bool(section.cache_targets), f"{stage}.cache_targets=true", f"{stage}.cache_targets=false"),
               (bool(section.teacher_context), f"{stage}.teacher_context", f"{stage}.teacher_context=null"),
               (has_images, "image examples in data.train or data.eval", "text-only data")]
    for bad, what, fix in refused:
        if bad:
            raise UserError(f"distributed.sequence_parallel={n}: {what} is not sharded over sequence-parallel "
                            f"ranks yet; fix: {fix}, or distributed.sequence_parallel=1")


def data_parallel(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) among data-parallel replicas: the N ranks of an SP group read the same rows."""
    if not dist.is_initialized():
        return 0, 1
    n = size(group)
    return dist.get_rank() // n, dist.get_world_size() // n


def shard_batch(batch, group: dist.ProcessGroup | None, pad_id: int):
    """This rank's shard of a loader Batch: T padded to a multiple of N (padding: segment 0, no loss),
    ids/targets/loss_mask/positions sliced, segments whole (see shard()). Targets are the full row's
    next tokens already, so the shard's loss positions are exactly its part of the full row's."""
    n = size(group)
    if n == 1:
        return batch
    if batch.pixel_values is not None:
        raise UserError("sequence parallelism does not take image batches yet; fix: text-only data, or "
                        "distributed.sequence_parallel=1")
    pad = -batch.ids.shape[1] % n
    fill = {"ids": pad_id, "targets": IGNORE, "loss_mask": False, "positions": 0, "segments": 0}
    full = {k: torch.nn.functional.pad(getattr(batch, k), (0, pad), value=v) if pad else getattr(batch, k)
            for k, v in fill.items()}
    return batch._replace(**shard(full, group))


def first_of_runs(mask: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """mask & not mask at the previous position of the FULL row, on this rank's shard of a (B, T) mask: a
    run that continues from the previous shard does not start here."""
    before = torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    if size(group) > 1:
        last = gather(mask[:, -1:].contiguous(), group)  # (B, N): each shard's last position
        r = dist.get_rank(group)
        before[:, 0] = last[:, r - 1] if r > 0 else False
    return mask & ~before


def apply(model: Gemma3, group: dist.ProcessGroup | None) -> Gemma3:
    """Route every decoder layer's attention through Ulysses over `group` (None: back to single-rank).
    Afterwards the model expects sharded ids/positions and FULL segments/token_type_ids (see shard())."""
    cfg = model.config
    attend = None if size(group) == 1 else UlyssesAttention(group, cfg.num_heads, cfg.num_kv_heads)
    for block in model.layers:
        block.self_attn.sequence_parallel = attend
    return model


__all__ = ["FULL_KEYS", "new_group", "size", "shard", "gather", "token_mean", "kv_repeat", "UlyssesAttention",
           "SHARDED_STAGES", "UNSHARDED_STAGES",
           "check_trainable", "check_distill", "data_parallel", "shard_batch", "first_of_runs", "apply"]
