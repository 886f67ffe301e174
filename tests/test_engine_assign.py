"""Engine.assign_local: training continues from the assigned weights under every ZeRO stage.

ZeRO 1-3 keep float32 master copies inside the optimizer; writing new values into the parameters
alone would be undone by the next step (it would update the old master and copy it back). WARP
starts each iteration's runs from the LITI result this way, so this is the property it rests on.
A swap with refresh_master=False (the EMA anchor) must leave the master copy alone.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, torch
from posttrain.recipe import load_config
from posttrain.engine import Engine, init_distributed
from posttrain.model import build_model
from posttrain.losses import chunked_cross_entropy

stage, out = int(sys.argv[1]), sys.argv[2]
cfg = load_config(["recipe=smoke", f"distributed.zero_stage={stage}", f"run_dir={out}"])
init_distributed()
model = build_model(cfg.model.student.preset_config(), seed=0)
engine = Engine(model, cfg, lr=1e-4, steps=2, warmup_steps=0, out_dir=cfg.out_dir / "e")
ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

def step():
    loss = engine.module(lambda h, w: chunked_cross_entropy(h[:, :-1], w, ids[:, 1:]), ids)
    engine.backward(loss)
    engine.step()

base = {k: v.detach().clone() for k, v in engine.local_shards().items()}
moved = {k: v + 0.5 for k, v in base.items()}
engine.assign_local(moved)
step()
after = engine.local_shards()
far = max(float((after[k] - moved[k]).abs().max()) for k in after)
assert far < 0.01, f"stage {stage}: training went back to the old weights (max |diff| from assigned {far})"

# a temporary swap without refresh: the next step continues from the weights before the swap
kept = {k: v.detach().clone() for k, v in engine.local_shards().items()}
engine.assign_local(base, refresh_master=False)
engine.assign_local(kept, refresh_master=False)
step()
after = engine.local_shards()
far = max(float((after[k] - kept[k]).abs().max()) for k in after)
assert far < 0.01, f"stage {stage}: a swap without refresh changed the master weights ({far})"
print("ok", stage)
"""


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_training_continues_from_assigned_weights(stage, tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(stage), str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and f"ok {stage}" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
