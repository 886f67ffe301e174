"""Ulysses sequence parallelism (posttrain/sequence_parallel.py) in a real 2-rank gloo world: one packed
batch split along T over both ranks gives the single-rank model's logits, loss and parameter gradients
(summed over the ranks), on sliding and global layers with one kv head repeated for the exchange; and
causal_attention's image blocks, sliding window and segments survive the exchange (6 heads, 3 kv heads).

This file is also the worker: torchrun runs it as a script, each rank writes its measured maxima."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def test_kv_repeat_and_head_checks():
    from posttrain.sequence_parallel import kv_repeat

    assert kv_repeat(4, 1, 2) == 2 and kv_repeat(8, 4, 2) == 1 and kv_repeat(6, 3, 2) == 2 and kv_repeat(8, 2, 8) == 4
    with pytest.raises(ValueError, match=r"query heads \(3\) divisible by 2"):
        kv_repeat(3, 1, 2)


def test_only_the_distill_stage_takes_it():
    from posttrain.errors import UserError
    from posttrain.recipe import load_config
    from posttrain.sequence_parallel import check_distill, check_trainable

    cfg = load_config(["recipe=it_4b_128k"])
    assert cfg.distributed.sequence_parallel == 8 and cfg.stages == ["distill", "export"]
    check_trainable(cfg)  # distill shards its batches
    with pytest.raises(UserError, match=r"sequence_parallel=8 .*not yet by warm, policy; fix: set "
                                        r"distributed.sequence_parallel=1"):
        check_trainable(load_config(["recipe=it_4b_128k", "stages=[distill, warm, policy]"]))
    for override, what in [("distill.method=on_policy", "method=on_policy"), ("distill.cache_targets=true",
                                                                            "cache_targets=true")]:
        bad = load_config(["recipe=it_4b_128k", override])
        with pytest.raises(UserError, match=rf"distill.{what} is not sharded .*; fix: "):
            check_distill(bad, bad.distill, "distill", has_images=False)
    with pytest.raises(UserError, match=r"image examples .*; fix: text-only data"):
        check_distill(cfg, cfg.distill, "distill", has_images=True)
    check_distill(cfg, cfg.distill, "distill", has_images=False)
    check_trainable(load_config(["recipe=it_4b_128k", "distributed.sequence_parallel=1", "stages=[warm]"]))
    check_trainable(load_config(["recipe=it_4b_128k", "stages=[export]"]))


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "SP_OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).resolve())]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        print(f"rank {r}: {got}")
        assert got["uneven_error"], "T % N != 0 must raise a clear error"
        assert got["batch_ids_ok"], "shard_batch: padding to a multiple of N, then this rank's slice"
        assert got["starts_ok"], "first_of_runs: a loss run continuing from the previous shard starts there"
        for key, value in got.items():
            if key.startswith("max_"):
                assert value <= TOL, f"rank {r}: {key} = {value:.3g} > {TOL}"


# ----------------------------------------------------------------------------- worker (under torchrun)

def _model_case(group, out: dict) -> None:
    import copy

    import torch
    import torch.nn.functional as F
    import torch.distributed as dist

    from posttrain import sequence_parallel as sp
    from posttrain.model import GemmaConfig, build_model

    cfg = GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=7, num_heads=4,
                      num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
    assert cfg.is_global(5) and not cfg.is_global(4)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # nonzero norm weights, so their gradients are exercised as well
        for i, p in enumerate(model.parameters()):
            if p.ndim == 1:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(i))
    gen = torch.Generator().manual_seed(1)
    B, T = 2, 24
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    # row 0: documents of 9 and 15 tokens (positions restart); row 1: 13 + 7 tokens, 4 of padding (segment 0)
    segments = torch.tensor([[1] * 9 + [2] * 15, [1] * 13 + [2] * 7 + [0] * 4])
    positions = torch.cat([torch.cat([torch.arange(9), torch.arange(15)])[None],
                           torch.cat([torch.arange(13), torch.arange(7), torch.zeros(4, dtype=torch.long)])[None]])
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    last_of_doc = segments != F.pad(segments, (0, 1))[:, 1:]
    labels = labels.masked_fill(last_of_doc | (segments == 0), -100)  # shifted over the full row, before sharding

    def token_losses(logits, lab):
        return F.cross_entropy(logits.flatten(0, 1), lab.clamp_min(0).flatten(), reduction="none").view(lab.shape)

    ref_model = copy.deepcopy(model)
    ref_logits = ref_model(ids, positions, segments)
    mask = labels >= 0
    ref_loss = (token_losses(ref_logits, labels) * mask).sum() / mask.sum()
    ref_loss.backward()

    sp.apply(model, group)
    part = sp.shard({"ids": ids, "positions": positions, "segments": segments, "labels": labels}, group)
    assert part["ids"].shape == (B, T // 2) and part["segments"].shape == (B, T)
    logits = model(part["ids"], part["positions"], part["segments"])
    loss = sp.token_mean(token_losses(logits, part["labels"]), part["labels"] >= 0, group)
    loss.backward()
    full_loss = loss.detach().clone()
    dist.all_reduce(full_loss, group=group)
    out["max_logits"] = float((sp.gather(logits.detach(), group) - ref_logits.detach()).abs().max())
    out["max_loss"] = float((full_loss - ref_loss.detach()).abs())
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)  # what the data-parallel all-reduce of the shard losses adds up
        worst = max(worst, float((g - q.grad).abs().max()))
        assert float(q.grad.abs().max()) > 0, f"{name}: zero reference gradient, the check would be vacuous"
    out["max_grad"] = worst
    out["ref_loss"] = float(ref_loss)

    try:
        sp.shard({"ids": ids[:, :23]}, group)
        out["uneven_error"] = False
    except ValueError as e:
        out["uneven_error"] = "divisible by 2" in str(e) and "'ids'" in str(e)


def _attention_case(group, out: dict) -> None:
    import torch
    import torch.distributed as dist

    from posttrain import sequence_parallel as sp
    from posttrain.model import causal_attention

    B, H, K, T, D = 2, 6, 3, 16, 8  # 3 kv heads over 2 ranks: repeated to 6 (order matters)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, n, T, D, generator=gen, requires_grad=True) for n in (H, K, K))
    segments = torch.tensor([[1] * 10 + [2] * 6, [1] * 16])
    blocks = torch.full((B, T), -1)
    blocks[0, 5:10] = 0  # an image across the shard boundary (tokens 0-7 | 8-15)
    blocks[1, 6:12] = 0
    attend = sp.UlyssesAttention(group, H, K)
    r, half = dist.get_rank(group), T // 2
    cut = slice(r * half, (r + 1) * half)
    for window in (3, None):
        ref = causal_attention(q, k, v, scale=D**-0.5, window=window, segments=segments, blocks=blocks)
        grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        local = attend(q[:, :, cut], k[:, :, cut], v[:, :, cut], scale=D**-0.5, window=window,
                       segments=segments, blocks=blocks)
        grads = [g.clone() for g in torch.autograd.grad(local.square().sum(), (q, k, v))]
        for g in grads:
            dist.all_reduce(g, group=group)
        tag = "sliding" if window else "global"
        out[f"max_attn_{tag}"] = float((sp.gather(local.detach(), group, dim=2) - ref.detach()).abs().max())
        out[f"max_attn_grad_{tag}"] = max(float((g - gr).abs().max()) for g, gr in zip(grads, grads_ref))


def _batch_case(group, out: dict) -> None:
    """shard_batch pads 7 tokens to 8 (no loss, segment 0) and slices; first_of_runs finds the starts
    of the full row's loss runs on each shard, one that continues from the previous shard excluded."""
    import torch
    import torch.distributed as dist

    from posttrain import sequence_parallel as sp
    from posttrain.loader import Batch

    r = dist.get_rank(group)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    ids = torch.arange(14).view(2, 7)
    batch = Batch(ids=ids, targets=torch.where(mask, ids + 1, -100), loss_mask=mask, positions=ids % 7,
                  segments=torch.ones(2, 7, dtype=torch.long), index=[[0], [1]])
    part = sp.shard_batch(batch, group, pad_id=99)
    want_ids = [[[0, 1, 2, 3], [7, 8, 9, 10]], [[4, 5, 6, 99], [11, 12, 13, 99]]][r]
    out["batch_ids_ok"] = part.ids.tolist() == want_ids and part.segments.shape == (2, 8) \
        and part.segments[:, 7].tolist() == [0, 0] and not bool(part.loss_mask[:, 3].any() if r else False)
    starts = sp.first_of_runs(part.loss_mask, group)
    want = [[[0, 1, 0, 0], [1, 0, 0, 0]], [[0, 0, 1, 0], [1, 0, 0, 0]]][r]  # full: (1, 6) and (0, 4)
    out["starts_ok"] = starts.long().tolist() == want


def _worker() -> None:
    import torch

    from posttrain import sequence_parallel as sp
    from posttrain.engine import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed()
    group = sp.new_group(2)
    out: dict = {}
    _model_case(group, out)
    _attention_case(group, out)
    _batch_case(group, out)
    (Path(os.environ["SP_OUT"]) / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker()
