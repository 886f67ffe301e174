"""The policy stage through train.py, as users run it: real processes, DeepSpeed on CPU (gloo).

- J-BOND on 2 ranks with ZeRO-3: killed with SIGKILL after a checkpoint and resumed, it gives the
  same per-step losses and rewards and bit-identical final weights as a straight run (the EMA
  anchor's shards, the sampler seeds and the prompt order are part of the checkpoint); the ranks'
  metrics differ in keys (safety sub-metrics of the prompts each rank drew) and are still merged;
- WARP reports every stage of every iteration (init, each run, SLERP, LITI) and the eta sweep;
- missing inputs fail with one clear error line.
The model is the smoke recipe's tiny random Gemma 3; the reward is the brevity reward of
examples/my_reward.py with a small budget, so rewards differ between samples.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from launch import kill_all, train_py
from safetensors.torch import load_file

from posttrain.tracking import offline_history

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
BASE = ["recipe=smoke", "stages=[policy]", f"policy.steps={STEPS}", "policy.eval_size=4", "checkpoint.every=2",
        "rewards=[{name: examples/my_reward.py:brevity, options: {max_chars: 20}}]", "tracking.log_every=1"]
# the safety reward's sub-metrics (per-category refusal rates) differ between the ranks' batches
SAFETY = ["data.prompts=safety_prompts", "rewards=[{name: examples/my_reward.py:brevity, options: {max_chars: 20}}, "
          "{name: safety, weight: 0.1, on_error: zero}]"]


def train(run_dir: Path, *overrides: str, ranks: int = 1, wait: bool = True, timeout: float = 400):
    return train_py([*BASE, f"run_dir={run_dir}", *overrides], ranks=ranks, wait=wait, timeout=timeout)


def records(run_dir: Path, prefix: str) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "smoke" / "policy" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if f"{prefix}/loss" in rec:
            out[rec["step"]] = rec
    return out


def test_bond_two_ranks_zero3_resume_after_sigkill_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    zero3 = ["distributed.zero_stage=3", "policy.algorithm=bond", "data.eval_safety=safety_prompts_eval",
             *SAFETY]  # WARP's resume: test_sigterm_resume
    res = train(straight, *zero3, ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = records(straight, "bond")
    assert sorted(a) == list(range(1, STEPS + 1))
    assert len({a[s]["bond/reward"] for s in a}) > 1  # the reward varies: the test is not vacuous
    assert any(k.startswith("bond/reward/safety/") and k.endswith("/refusal_rate") for s in a for k in a[s])

    proc = train(killed, *zero3, ranks=2, wait=False)
    ckpt = killed / "smoke" / "policy" / "bond" / "checkpoints" / "step_2"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_all(proc)  # torchrun and its ranks, which run in sessions of their own
    assert ckpt.exists(), proc.stdout.read()[-3000:]
    assert not (killed / "smoke" / "policy" / "bond" / "final").exists()
    assert (ckpt / "state_rank0.pt").exists() and (ckpt / "state_rank1.pt").exists()  # the anchor's shards
    res = train(killed, *zero3, "resume=true", ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    b = records(killed, "bond")
    for s in range(1, STEPS + 1):
        assert (a[s]["bond/loss"], a[s]["bond/reward"]) == (b[s]["bond/loss"], b[s]["bond/reward"]), s
    # the summary's paired comparison: the same 4 held-out problems before and after, gathered from both
    # ranks in problem order; the resumed run kept the scores from before its kill
    sa, sb = (json.loads((d / "smoke" / "policy" / "summary.json").read_text())["bond"] for d in (straight, killed))
    assert sa["paired"]["n"] == 4 and len(sa["scores"]["before"]) == len(sa["scores"]["after"]) == 4
    assert sum(sa["scores"]["after"]) / 4 == pytest.approx(sa["after"]["eval/verifier"])
    assert sa["paired"]["diff"] == pytest.approx(sa["after"]["eval/verifier"] - sa["before"]["eval/verifier"])
    assert (sa["scores"], sa["paired"]) == (sb["scores"], sb["paired"])
    for when in ("before", "after"):
        assert 0 <= sa[when]["eval/safety/harmful_refusal"] <= 1 and 0 <= sa[when]["eval/safety/benign_over_refusal"] <= 1
    wa = load_file(straight / "smoke" / "policy" / "bond" / "final" / "model.safetensors")
    wb = load_file(killed / "smoke" / "policy" / "bond" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_warp_reports_each_stage_and_the_eta_sweep(tmp_path):
    # max_chars 30: the tiny model's 8-token completions are 30-60 characters long, so every run's rewards
    # vary and every run moves (at 20 most score 0, at 60 all 1: a run whose rewards all tie has no gradient)
    res = train(tmp_path, "policy.algorithm=warp", "policy.steps=2", "policy.warp_runs=2", "policy.warp_iterations=2",
                "rewards=[{name: examples/my_reward.py:brevity, options: {max_chars: 30}}]")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "smoke" / "policy" / "summary.json").read_text())["warp"]
    stages = [(row["iteration"], row["stage"]) for row in summary["history"]]
    assert stages == [(i, s) for i in (1, 2) for s in ("init", "run_0", "run_1", "slerp", "liti")]
    for row in summary["history"]:
        assert {"eval/verifier", "eval/reward", "eval/kl_to_init"} <= set(row)
        if row["stage"] == "init":
            assert row["eval/kl_to_init"] == pytest.approx(0.0, abs=1e-5)
        else:
            assert row["eval/kl_to_init"] != 0.0
    sweep = json.loads((tmp_path / "smoke" / "policy" / "warp" / "eta_sweep.json").read_text())
    assert [r["eta"] for r in sweep] == [0.1, 0.3, 0.5, 1.0]
    kls = [r["eval/kl_to_init"] for r in sweep]
    assert kls[0] < kls[-1]  # further along the path, further from the init
    assert (tmp_path / "smoke" / "policy" / "warp" / "final" / "model.safetensors").exists()
    lines = (tmp_path / "smoke" / "policy" / "metrics.jsonl").read_text().splitlines()
    assert any('"table": "warp_i1_r0/samples"' in line for line in lines)
    assert any('"warp_i2_r1/warp/kl_to_anchor"' in line for line in lines)


def test_missing_inputs_fail_with_one_clear_line(tmp_path):
    res = train(tmp_path, "data.prompts=null")
    assert res.returncode == 2 and "error: stage 'policy' needs data.prompts" in res.stderr, res.stderr[-2000:]
    res = train(tmp_path, "rewards=[{name: reward_model}]")
    assert res.returncode == 2 and "reward_model has no options.path" in res.stderr, res.stderr[-2000:]


def test_wandb_offline_run_holds_every_panel_and_stop_strings_end_rollouts(tmp_path):
    # "e" is in many of the tiny model's tokens: with it as a stop string rollouts end early
    res = train(tmp_path, "policy.steps=2", "policy.eval_every=1", "policy.stop=[e]", "policy.eval_temperature=0.7",
                "policy.eval_samples=2", "policy.max_new_tokens=24", "tracking.wandb=true", "tracking.mode=offline")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stage = tmp_path / "smoke" / "policy"
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    panels = {k for rec in logged if "table" not in rec for k in rec} - {"step", "time"}
    tables = {rec["table"] for rec in logged if "table" in rec}
    runs = list((stage / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = offline_history(runs[0])
    in_wandb = {k for row in history for k in row}
    # wandb drops a record logged at a step below one it has seen: J-BOND then WARP (the smoke recipe's
    # bond_then_warp) must log at steps that never go back
    order = [rec["step"] for rec in logged]
    assert order == sorted(order), order
    assert panels <= in_wandb, sorted(panels - in_wandb)
    assert {"bond/samples", "warp/eta_sweep"} <= tables
    for rec in (rec for rec in logged if "table" in rec):  # wandb keeps a table as a media file of the run
        files = list((runs[0] / "files" / "media" / "table").glob(f"{rec['table']}_{rec['step']}_*.table.json"))
        assert len(files) == 1, (rec["table"], rec["step"])
        held = json.loads(files[0].read_text())
        assert held["columns"] == rec["columns"] and len(held["data"]) == len(rec["rows"])
    for key in ("bond/reward", "bond/loss", "bond/bond/kl", "bond/bond/win_rate", "bond/entropy", "bond/stopped",
                "bond/anchor_reward", "bond/eval/verifier", "bond/eval/reward", "bond/eval/stopped"):
        assert key in panels, key
    steps = [rec for rec in logged if "bond/loss" in rec]
    assert all(0 < rec["bond/stopped"] <= 1 and rec["bond/response_length"] < 24 for rec in steps)
    before = next(rec for rec in logged if rec["step"] == 0)
    assert before["bond/eval/stopped"] > 0 and before["bond/eval/length"] < 24  # the held-out samples stop too


def test_eval_samples_need_a_temperature(tmp_path):
    res = train(tmp_path, "policy.eval_samples=4")
    assert res.returncode == 2 and "policy.eval_samples=4 needs policy.eval_temperature > 0" in res.stderr, \
        res.stderr[-2000:]


@pytest.mark.slow
def test_loss_in_passes_gives_the_one_pass_step(tmp_path):
    """policy.rows_per_pass splits the loss's forward/backward into passes of whole prompts (here 2
    passes of 3 rows: each prompt's 2 samples and its best anchor sample) accumulated into one optimizer
    step, on 2 ranks with ZeRO-2 (the demo's setting): the same losses, gradient norms and final weights
    as one pass over all rows."""
    runs = {}
    for rows in (0, 3):
        run = tmp_path / f"rows{rows}"
        res = train(run, "policy.steps=2", "distributed.zero_stage=2", "policy.algorithm=bond",
                    f"policy.rows_per_pass={rows}", ranks=2)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs[rows] = (records(run, "bond"), load_file(run / "smoke" / "policy" / "bond" / "final" / "model.safetensors"))
    (one, w_one), (two, w_two) = runs[0], runs[3]
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        assert two[step]["bond/loss"] == pytest.approx(one[step]["bond/loss"], rel=1e-5)
        assert one[step]["bond/grad_norm"] > 0
        assert two[step]["bond/grad_norm"] == pytest.approx(one[step]["bond/grad_norm"], rel=1e-4)
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) <= 1e-6
