"""Engine.step's grad_norm is the global gradient norm before clipping, under every ZeRO stage.

DeepSpeed reports no norm with ZeRO 0 (its bare optimizer clips without one), which once logged
grad_norm = nan in every one-process run; the engine now measures it there itself. The reference is
torch.nn.utils.clip_grad_norm_ on a copy of the tiny model with the same loss, clipping to 1e-3 so a
post-clip norm could not pass for the pre-clip one. The copy steps with torch's own AdamW (its default
per-tensor loop) and LR schedule: the engine's update (torch's fused CPU AdamW under DeepSpeed) must
leave the same weights.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import copy, math, sys, torch
from posttrain.recipe import load_config
from posttrain.engine import Engine, WithHead, init_distributed, lr_lambda
from posttrain.model import build_model
from posttrain.losses import chunked_cross_entropy

stage, out = int(sys.argv[1]), sys.argv[2]
cfg = load_config(["recipe=smoke", f"distributed.zero_stage={stage}", "distributed.grad_clip=0.001",
                   "model.freeze_embeddings=false", f"run_dir={out}"])
init_distributed()
model = build_model(cfg.model.student.preset_config(), seed=0)
ref = copy.deepcopy(model)
engine = Engine(model, cfg, lr=1e-4, steps=3, warmup_steps=0, out_dir=cfg.out_dir / "e")
gen = torch.Generator().manual_seed(0)
opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(3, 0))

def loss_fn(ids):
    return lambda h, w: chunked_cross_entropy(h[:, :-1], w, ids[:, 1:])

for step in range(2):  # the second step's norm, after a clipped update, must be its own
    ids = torch.randint(3, 1000, (2, 16), generator=gen)
    loss = engine.module(loss_fn(ids), ids)
    engine.backward(loss)
    got = engine.step()["grad_norm"]
    ref.zero_grad()
    WithHead(ref)(loss_fn(ids), ids).backward()
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.001))
    assert math.isfinite(got), f"stage {stage} step {step}: grad_norm {got}"
    assert abs(got - want) <= 1e-4 * want, f"stage {stage} step {step}: engine {got} vs torch {want}"
    assert want > 0.01, f"stage {stage}: norm {want} too small to tell pre-clip from post-clip"
    print("step", step, "engine", got, "torch", want)
    opt.step()
    sched.step()
    with engine.full_weights() as full:
        mine = full.state_dict()
    worst = max(float((mine[k] - v).abs().max()) for k, v in ref.state_dict().items())
    assert worst <= 1e-6, f"stage {stage} step {step}: weights differ from torch AdamW's by {worst} (lr 1e-4)"
print("ok", stage)
"""


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_grad_norm_is_the_pre_clip_global_norm(stage, tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(stage), str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"ok {stage}" in res.stdout
