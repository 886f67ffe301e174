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


def test_training_stages_refuse_it_until_wired():
    from posttrain.errors import UserError
    from posttrain.recipe import load_config
    from posttrain.sequence_parallel import check_trainable

    cfg = load_config(["recipe=it_4b_128k"])
    assert cfg.distributed.sequence_parallel == 8
    with pytest.raises(UserError, match=r"sequence_parallel=8 .*\(distill\); fix: set distributed.sequence_parallel=1"):
        check_trainable(cfg)
    check_trainable(load_config(["recipe=it_4b_128k", "distributed.sequence_parallel=1"]))
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
    (Path(os.environ["SP_OUT"]) / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker()
