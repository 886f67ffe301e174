"""The paired comparison the policy stage reports (posttrain/stats.py) and the held-out bookkeeping behind it
(posttrain/stages/rl.py's evaluate): per-problem scores in problem order, safety refusal rates by label."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from posttrain.recipe import load_config
from posttrain.stages import rl
from posttrain.stats import format_interval, paired_interval


def test_the_interval_is_the_normal_one_for_many_problems_and_narrows_with_pairing():
    rng = np.random.default_rng(0)
    skill = rng.random(4000)  # problems differ a lot in difficulty; the model gains 0.05 on each
    before = (rng.random(4000) < skill).astype(float)
    after = np.where(rng.random(4000) < 0.9, before, (rng.random(4000) < np.clip(skill + 0.5, 0, 1)))
    r = paired_interval(before, after, seed=1)
    d = after - before
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert r["diff"] == pytest.approx(d.mean())
    assert r["lo"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r["hi"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    unpaired = 1.96 * np.sqrt(before.var(ddof=1) / 4000 + after.var(ddof=1) / 4000)
    assert (r["hi"] - r["lo"]) / 2 < 0.6 * unpaired  # the same problems' difficulty cancels


def test_the_95_interval_covers_the_true_gain_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(200):
        before = (rng.random(256) < 0.3).astype(float)
        flip_up = rng.random(256) < 0.10  # true gain: 0.10 * 0.7 - 0.05 * 0.3 = 0.055
        flip_down = rng.random(256) < 0.05
        after = np.where(before == 0, flip_up, ~flip_down).astype(float)
        r = paired_interval(before, after, samples=2000, seed=trial)
        covered += r["lo"] <= 0.055 <= r["hi"]
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_identical_scores_give_a_zero_width_interval_and_bad_input_is_refused():
    r = paired_interval([0.25, 1.0, 0.0], [0.25, 1.0, 0.0])
    assert (r["diff"], r["lo"], r["hi"], r["n"]) == (0.0, 0.0, 0.0, 3)
    assert paired_interval([0, 1], [1, 1], seed=5) == paired_interval([0, 1], [1, 1], seed=5)
    assert format_interval({"diff": 0.05, "lo": -0.01, "hi": 0.1}) == "+0.050 [-0.010, +0.100]"
    with pytest.raises(ValueError, match="equal-length"):
        paired_interval([0, 1], [1])
    with pytest.raises(ValueError, match="at least one"):
        paired_interval([], [])


class _Comps(list):
    stopped = 1.0


def test_evaluate_reports_per_problem_scores_in_order_and_safety_rates_by_label(monkeypatch):
    cfg = load_config(["recipe=smoke", "policy.eval_size=5", "policy.eval_temperature=0.7", "policy.eval_samples=2"])
    held_scores = {0: [1.0, 0.0], 1: [0.0, 0.0], 2: [1.0, 1.0], 3: [0.0, 1.0], 4: [1.0, 0.0], 5: [1.0, 1.0]}
    refuses = {0: [True, True], 1: [False, True], 2: [False, False]}  # safety rows 0, 1 harmful; 2 benign

    class Held:
        rows = [{"prompt": f"q{i}"} for i in range(6)]  # one more than eval_size: it is not evaluated

    class Safety:
        rows = [{"prompt": "a", "harmful": True}, {"prompt": "b", "harmful": True}, {"prompt": "c", "harmful": False}]

    def rollout(engine, prompts, idx, k, cfg, tok, seed, temperature=None):
        assert k == 2 and seed == 0 and temperature == 0.7  # the same draw before and after training
        out = _Comps([[[i]] * k for i in idx]) if prompts is not Safety else _Comps([[[100 + i]] * k for i in idx])
        out.finished = [True] * (len(idx) * k)
        return out

    def decode(tok, comps):
        out = []
        for row in comps:
            i = row[0][0]
            out.append([("I can't help with that." if refuse else "Sure, here it is.")
                        for refuse in refuses[i - 100]] if i >= 100 else [str(i)] * len(row))
        return out

    def score(reward, prompts, idx, texts):
        return torch.tensor([held_scores[i] for i in idx]), None

    monkeypatch.setattr(rl, "rollout", rollout)
    monkeypatch.setattr(rl, "decode", decode)
    monkeypatch.setattr(rl, "score", score)
    metrics, scores = rl.evaluate(None, Held, None, None, cfg, None, per_problem=True, safety=Safety)
    assert scores == [0.5, 0.0, 1.0, 0.5, 0.5]
    assert metrics["eval/verifier"] == pytest.approx(np.mean(scores))
    assert metrics["eval/verifier_se"] == pytest.approx(np.std(scores, ddof=1) / np.sqrt(5))
    assert metrics["eval/safety/harmful_refusal"] == pytest.approx(3 / 4)
    assert metrics["eval/safety/benign_over_refusal"] == 0.0
    assert metrics["eval/stopped"] == 1.0
    assert rl.evaluate(None, Held, None, None, cfg, None) == {k: v for k, v in metrics.items() if "safety" not in k}
