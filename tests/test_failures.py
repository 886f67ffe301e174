"""Failures that speak, through train.py as users run it (real processes, the smoke recipe's tiny model):

- a reward that fails on every call stops the policy stage within policy.rewards_max_failed_steps
  steps with one error line naming it and its exception, exit 2, the last checkpoint usable;
- a reward that breaks its contract (a wrong-length list) stops at its first call, on 2 ranks too;
- `on_error: raise` ends as one error line from one rank and exit 2 under 2 ranks, with no traceback
  (--debug shows it);
- a second run on a directory that a live run holds is refused, naming the holder; once the holder
  is killed, resume=true takes its lock over and finishes;
- a dry run with an unknown reward name exits 2 naming it, before anything loads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launch import ROOT, kill_all, train_py

POLICY = ["recipe=smoke", "stages=[policy]", "policy.eval_size=2", "data.eval_prompts=[]", "tracking.log_every=1"]
REWARDS = '''
def always_raises(prompts, completions, **columns):
    raise ZeroDivisionError("the checker divided by zero")


def one_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def brief(prompts, completions, **columns):
    return [max(0.0, 2.0 - len(c) / 30) for c in completions]
'''


def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def launch_two_ranks(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "posttrain.launch", "--nproc_per_node=2", str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})


def test_a_reward_failing_every_call_stops_the_stage_within_the_limit(tmp_path):
    rewards = f"rewards=[{{name: {reward_file(tmp_path)}:always_raises}}]"
    res = train_py([*POLICY, rewards, "policy.steps=20", "checkpoint.every=1", "policy.rewards_max_failed_steps=3",
                    f"run_dir={tmp_path}"], timeout=400)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    (line,) = errors(res.stderr)
    assert "reward 'always_raises' scored no sample in 3 consecutive steps (1-3" in line
    assert "ZeroDivisionError: the checker divided by zero" in line and "rewards_max_failed_steps" in line
    assert "Traceback" not in res.stderr
    logged = [json.loads(x) for x in (tmp_path / "smoke" / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged if "bond/loss" in r) <= 2  # stopped in step 3, before logging it
    assert "checkpoints/step_2) stays usable" in line
    assert (tmp_path / "smoke" / "policy" / "bond" / "checkpoints" / "step_2").is_dir()


def test_a_wrong_length_return_stops_at_the_first_call_on_two_ranks(tmp_path):
    rewards = f"rewards=[{{name: {reward_file(tmp_path)}:one_short}}]"
    res = launch_two_ranks([*POLICY, rewards, "policy.steps=5", "data.eval=null", f"run_dir={tmp_path}"])
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    (line,) = errors(res.stdout + res.stderr)
    assert "reward 'one_short' broke the reward contract" in line and "got 3 for 4" in line
    assert "a list of 4 floats" in line and "Traceback" not in res.stdout + res.stderr


def test_on_error_raise_is_one_line_under_two_ranks_and_debug_shows_the_traceback(tmp_path):
    rewards = f"rewards=[{{name: {reward_file(tmp_path)}:always_raises, on_error: raise}}]"
    res = launch_two_ranks([*POLICY, rewards, "policy.steps=5", f"run_dir={tmp_path}"])
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    (line,) = errors(out)
    assert "reward 'always_raises' failed (ZeroDivisionError: the checker divided by zero)" in line
    assert "Traceback" not in out
    res = train_py([*POLICY, rewards, "policy.steps=5", f"run_dir={tmp_path / 'debug'}", "--debug"], timeout=400)
    assert res.returncode != 0 and "Traceback" in res.stderr and "UserError" in res.stderr


def test_a_second_run_on_a_held_directory_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    rewards = f"rewards=[{{name: {reward_file(tmp_path)}:brief}}]"
    args = [*POLICY, rewards, "policy.algorithm=bond", "policy.steps=30", "checkpoint.every=1", f"run_dir={tmp_path}"]
    first = train_py(args, wait=False)
    metrics = tmp_path / "smoke" / "policy" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (not metrics.exists() or '"bond/loss"' not in metrics.read_text()) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.1)
    second = train_py(args, timeout=120)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    (line,) = errors(second.stderr)
    assert f"is in use by another run (pid {first.pid} on " in line and "name=" in line
    assert first.poll() is None  # the refused run changed nothing for the one holding the directory
    kill_all(first)
    res = train_py([*args, "resume=true", "policy.steps=3"], timeout=400)  # the stale lock is taken over
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_a_dry_run_with_an_unknown_reward_exits_2_naming_it(tmp_path):
    res = train_py(["recipe=smoke", "rewards=[{name: mathh}]", "dry_run=true", f"run_dir={tmp_path}"], timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "plan for 'smoke'" in res.stdout  # the plan is printed, then the problems
    (line,) = errors(res.stderr)
    assert "rewards.0 (mathh): unknown reward 'mathh'; did you mean 'math'?" in line
