"""WARM: members averaged tensor by tensor on ZeRO-3 shards equal the average of their whole weights;
mismatched members are refused; the averaged model is a reward the registry serves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewards
from posttrain.errors import UserError
from posttrain.reward_model import Pair, RewardModel, collate_pairs
from posttrain.tokenizer import load_tokenizer
from posttrain.stages.warm import average_shards, flip_labels

ROOT = Path(__file__).resolve().parents[1]


def member(init: str, **shapes) -> dict:
    return {"init": init, "shards": {k: torch.full(v, float(len(init))) for k, v in shapes.items()}}


def test_average_is_uniform_per_tensor():
    a = {"init": "x", "shards": {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}}
    b = {"init": "x", "shards": {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}}
    avg = average_shards([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and torch.equal(avg["b"], torch.tensor([0.5]))


def test_members_of_other_shapes_or_inits_are_refused():
    with pytest.raises(UserError, match=r"member 1's tensor w has shape \(3,\), member 0's \(2,\)"):
        average_shards([member("i", w=(2,)), member("i", w=(3,))])
    with pytest.raises(UserError, match="member 1 was fine-tuned from another init"):
        average_shards([member("i", w=(2,)), member("j", w=(2,))])
    with pytest.raises(UserError, match="member 1 has other tensors"):
        average_shards([member("i", w=(2,)), member("i", v=(2,))])


def test_label_noise_flips_the_stated_share():
    pairs = [Pair([i], [i + 100]) for i in range(40)]
    noisy = flip_labels(pairs, 0.25, seed=0)
    flipped = [p for p, q in zip(pairs, noisy) if p != q]
    assert len(flipped) == 10 and all(q == Pair(p.rejected, p.chosen) for p, q in zip(pairs, noisy) if p != q)
    assert noisy == flip_labels(pairs, 0.25, seed=0)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("warm")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "train.py"),
           "recipe=smoke", "stages=[warm]", "warm.steps=3", "warm.probe_steps=5", "warm.save_members=true",
           "warm.members=3", "data.eval_prompts=[]", f"run_dir={run}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run / "smoke" / "warm", res.stdout


def test_two_rank_zero3_average_equals_the_average_of_gathered_members(two_rank_run):
    out, _ = two_rank_run
    for file in ("model.safetensors", "reward_head.safetensors"):
        members = [load_file(out / f"member_{m}" / "reward_model" / file) for m in range(3)]
        warm = load_file(out / "reward_model" / file)
        assert warm.keys() == members[0].keys()
        for k in warm:
            want = (sum(m[k].double() for m in members) / 3).float()
            torch.testing.assert_close(warm[k], want, rtol=0, atol=1e-7)
        assert any(not torch.equal(members[0][k], members[1][k]) for k in warm)  # they did differ


def test_summary_reports_members_ens_warm_and_the_path(two_rank_run):
    out, stdout = two_rank_run
    s = json.loads((out / "summary.json").read_text())
    results = [json.loads((out / f"member_{m}" / "result.json").read_text()) for m in range(3)]
    assert s["member_accuracy"] == [r["accuracy"] for r in results]
    assert {r["lr"] for r in results} == {1e-5, 4e-5, 1e-4} and {r["dropout"] for r in results} == {0.05, 0.1}
    assert s["path_lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the path's ends are members 0 and 1 (reused, not re-evaluated); the 3 mixes between them are evaluated
    # on the held-out pairs: each is a count of them over their number
    assert s["path_accuracy"][0] == results[0]["accuracy"] and s["path_accuracy"][-1] == results[1]["accuracy"]
    for acc in s["path_accuracy"][1:-1]:
        assert 0 <= acc <= 1 and abs(acc * s["held_out_pairs"] - round(acc * s["held_out_pairs"])) < 1e-9
    assert 0 <= s["warm_accuracy"] <= 1 and 0 <= s["ens_accuracy"] <= 1
    assert 0 <= s["probe_accuracy"] <= 1  # the shared init, before any member trained
    assert "warm: held-out accuracy: linear probe (the shared init)" in stdout and "; members " in stdout


def test_the_averaged_model_is_a_registry_reward(two_rank_run):
    out, _ = two_rank_run
    rm = rewards.get("reward_model", path=str(out / "reward_model"), batch_size=2)
    prompts, completions = ["What is 2 + 3?", "What is 7 * 6?", "Hi"], ["2 + 3 = 5. Answer: 5", "Answer: 41", "Hello"]
    scores = rm(prompts, completions)
    model, tok = RewardModel.load(out / "reward_model"), load_tokenizer(out / "reward_model")
    for p, c, got in zip(prompts, completions, scores):
        ids = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}]).ids
        x, lengths = collate_pairs([Pair(ids, ids)], tok.pad_id)
        with torch.no_grad():
            assert got == pytest.approx(model(x[:1], lengths[:1]).item(), abs=1e-6)
    with pytest.raises(UserError, match="not a reward model directory"):
        RewardModel.load(out / "member_0")


def test_members_train_one_after_another_under_zero2(tmp_path):
    # ZeRO-2 keeps whole weights: each member's engine is built, trained, read and released in turn.
    cmd = [sys.executable, str(ROOT / "train.py"), "recipe=smoke", "stages=[warm]", "warm.steps=2", "warm.members=2",
           "warm.probe_steps=5", "distributed.zero_stage=2", "data.eval_prompts=[]", f"run_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads((tmp_path / "smoke" / "warm" / "summary.json").read_text())
    assert len(s["member_accuracy"]) == 2 and s["path_accuracy"][0] == s["member_accuracy"][0]
