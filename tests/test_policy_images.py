"""The policy stage with image prompts (TRL's vision format).

- Prompts: a row's image parts become its image blocks, the reward reads the text parts, a
  text-only policy given image rows is one error naming the row;
- sequence log-probs with images equal a full forward of each completion with its prompt's pixels,
  while the tower encodes each prompt's images once for all its samples;
- J-BOND then WARP through train.py on a tiny multimodal student: rewards see the prompt text and
  the row's columns (its images included), the projector trains (model.train_projector), the tower
  stays bit-identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import train_py
from test_vision_stages import TINY_VISION, image_rows, student_dir

import posttrain
from posttrain.errors import UserError
from posttrain.images import IMAGE_TOKEN_ID, ImageConfig
from posttrain.stages.rl import Prompts
from posttrain.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CFG = ImageConfig(size=TINY_VISION.image_size, tokens_per_image=TINY_VISION.mm_tokens_per_image)


def prompt_rows(tmp_path, n):
    """image_rows without the reply, plus the `answer` column a reward reads."""
    rows = image_rows(tmp_path, n)
    return [{"messages": r["messages"][:1], "images": r["images"], "answer": r["messages"][1]["content"]}
            for r in rows]


def test_prompts_hold_image_blocks_and_the_text_parts(tmp_path):
    tok = load_tokenizer("gemma3-270m")
    rows = prompt_rows(tmp_path, 2) + [{"prompt": "What is 2 + 3?"}]
    p = Prompts(rows, tok, "data.prompts", CFG)
    assert p.has_images and p.with_images == [True, True, False]
    assert [ids.count(IMAGE_TOKEN_ID) for ids in p.ids] == [4, 4, 0]
    assert p.text == ["Colour?", "Colour?", "What is 2 + 3?"]
    assert p.pixels(0).shape == (1, 3, 28, 28) and p.pixels(2) is None
    assert not torch.equal(p.pixels(0), p.pixels(1))  # red and green squares
    assert p.columns([0, 1], 2)["answer"] == ["red", "red", "green", "green"]
    with pytest.raises(UserError, match=r"row 1 .*data\.prompts.*text-only"):
        Prompts(rows, tok, "data.prompts")


SCRIPT = r"""
import sys, torch
from pathlib import Path
sys.path.insert(0, "tests")
from test_policy_images import prompt_rows
from test_vision_stages import student_dir
from posttrain.recipe import load_config
from posttrain.engine import Engine, init_distributed
from posttrain.images import image_config
from posttrain.stages.rl import Prompts, seq_logprobs
from posttrain.tokenizer import load_tokenizer

tmp = Path(sys.argv[1])
cfg = load_config(["recipe=smoke", "distributed.zero_stage=0", f"run_dir={tmp}"])
init_distributed()
_, model = student_dir(tmp)
reference = {k: v.clone() for k, v in model.state_dict().items()}
tok = load_tokenizer("gemma3-270m")
prompts = Prompts(prompt_rows(tmp, 3) + [{"prompt": "Hi"}], tok, "data.prompts", image_config(model.config))
engine = Engine(model, cfg, lr=1e-4, steps=1, warmup_steps=0, out_dir=tmp / "e")
calls = []
model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
idx = [2, 3, 0]
comps = [[[100 + j, 200 + k, 7][: 2 + j % 2] for j in range(3)] for k in range(len(idx))]
with torch.no_grad():
    lp = seq_logprobs(engine, prompts, idx, comps, cfg, tok.pad_id)
assert calls == [2], calls  # prompts 2 and 0 hold one image each: one call, one encoding each, for 3 samples
for a, i in enumerate(idx):
    for j, c in enumerate(comps[a]):
        ids = torch.tensor([prompts.ids[i] + c])
        px = prompts.pixels(i)
        with torch.no_grad():
            logits = model(ids, pixel_values=px) if px is not None else model(ids)
        logp = torch.log_softmax(logits[0, :-1].double(), -1)
        want = float(sum(logp[len(prompts.ids[i]) - 1 + t, c[t]] for t in range(len(c))))
        got = float(lp[a, j])
        assert abs(got - want) < 1e-4, (a, j, got, want)
print("ok", float(lp.abs().sum()))
"""


def test_sequence_logprobs_with_images_encode_each_prompt_once(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


PROBE = '''
import json, os

def probe(prompts, completions, answer=None, images=None, **columns):
    with open(os.environ["PROBE_OUT"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "answer": answer, "images": images}) + "\\n")
    return [float(a in c) for a, c in zip(answer, completions)]
'''


@pytest.mark.slow
def test_policy_stage_with_image_prompts(tmp_path):
    source, model = student_dir(tmp_path)
    data = tmp_path / "prompts.jsonl"
    rows = prompt_rows(tmp_path, 8)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "probe.py").write_text(PROBE)
    seen = tmp_path / "seen.jsonl"
    run = tmp_path / "run"
    os.environ["PROBE_OUT"] = str(seen)
    try:
        res = train_py(["recipe=smoke", "stages=[policy]", f"model.student.source={source}",
                        "model.student.preset=null", "model.student.arch={}", f"data.prompts={data}",
                        f"data.eval={data}", "policy.eval_size=4", "policy.eta_sweep=[1.0]", "model.train_projector=true",
                        f"rewards=[{{name: {tmp_path / 'probe.py'}:probe}}]", f"run_dir={run}"], timeout=600)
    finally:
        del os.environ["PROBE_OUT"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert calls and all(set(c["prompts"]) == {"Colour?"} for c in calls)
    colour = {r["images"][0]: r["answer"] for r in rows}  # each row's columns reach the reward together
    assert all(colour[im[0]] == a for c in calls for a, im in zip(c["answer"], c["images"]))
    summary = json.loads((run / "smoke" / "policy" / "summary.json").read_text())
    assert {"bond", "warp"} <= set(summary) and "eval/verifier" in summary["warp"]["after"]
    after = posttrain.load_model(run / "smoke" / "policy" / "warp" / "final").state_dict()
    before = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("vision_tower."))
    assert not torch.equal(after["multi_modal_projector.mm_input_projection_weight"],
                           before["multi_modal_projector.mm_input_projection_weight"])
