"""SIGTERM in every trained stage that distill's tests do not cover (a WARM member, J-BOND, a WARP run),
through train.py as users run it: the stage writes a checkpoint, train.py exits 0 with the message,
and resume=true finishes with the same per-step metrics and bit-identical final weights as a run
that was never stopped. A finished run keeps no step checkpoints or intermediate shards by default
(checkpoint.keep_optimizer=false), a resumed finished run skips its stages, and one whose steps were
raised says why it cannot continue (checked on the J-BOND case's straight run). The model is the smoke recipe's tiny random Gemma 3.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from launch import train_py
from safetensors.torch import load_file

POLICY = ["stages=[policy]", "policy.eval_size=4", "data.eval_prompts=[]",
          "rewards=[{name: examples/my_reward.py:brevity, options: {max_chars: 30}}]"]  # rewards vary
CASES = {
    # stage dir, the interrupted loop's loss key, the final model directory, overrides
    "warm member": ("warm", "member_1/loss", "warm/reward_model",
                    ["stages=[warm]", "warm.steps=4", "warm.members=2", "warm.probe_steps=5", "data.eval_prompts=[]"]),
    "J-BOND": ("policy", "bond/loss", "policy/bond/final", [*POLICY, "policy.algorithm=bond", "policy.steps=4"]),
    "WARP run": ("policy", "warp_i1_r1/loss", "policy/warp/final",
                 [*POLICY, "policy.algorithm=warp", "policy.steps=3", "policy.warp_runs=2", "policy.warp_iterations=1",
                  "policy.eta_sweep=[1.0]"]),
}


def train(run: Path, overrides: list[str], *more: str, wait: bool = True):
    return train_py(["recipe=smoke", "checkpoint.every=0", "tracking.log_every=1", f"run_dir={run}", *overrides,
                     *more], wait=wait, timeout=400)


def losses(run: Path, stage: str, key: str) -> dict[int, float]:
    """step -> the last value logged for it (a resumed run logs again the steps after its checkpoint)."""
    out = {}
    for line in (run / "smoke" / stage / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(f).items()}
    return out


def sigterm_when_logged(proc, metrics: Path, key: str, timeout: float = 300) -> str:
    """SIGTERM once the loop under test has logged its first step; the run's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and f'"{key}"' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_then_resume_is_exact(case, tmp_path):
    stage, key, final, overrides = CASES[case]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    res = train(straight, overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    want = losses(straight, stage, key)
    assert len(want) >= 3 and len(set(want.values())) > 1, want  # a loop of several steps that trains

    # by default a finished run keeps its final models, not its step checkpoints or intermediate shards
    assert not list((straight / "smoke").rglob("checkpoints")), list((straight / "smoke").rglob("checkpoints"))
    assert not list((straight / "smoke").rglob("shard_rank*.pt")) and not list((straight / "smoke").rglob("final_rank*"))

    proc = train(stopped, overrides, wait=False)
    out = sigterm_when_logged(proc, stopped / "smoke" / stage / "metrics.jsonl", key)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved step" in out and "resume with resume=true" in out, out[-3000:]
    assert not (stopped / "smoke" / final).exists()  # stopped before the stage's end
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert 1 <= saved < len(want), out[-3000:]

    res = train(stopped, overrides, "resume=true")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert losses(stopped, stage, key) == want
    wa, wb = weights(straight / "smoke" / final), weights(stopped / "smoke" / final)
    assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact on CPU
    if case == "J-BOND":
        a_finished_run_skips_its_stages_and_more_steps_say_why_they_cannot_run(straight, overrides)


def a_finished_run_skips_its_stages_and_more_steps_say_why_they_cannot_run(run: Path, overrides: list[str]):
    res = train(run, overrides, "resume=true")
    assert res.returncode == 0 and "J-BOND already finished: it trained step 4 of 4" in res.stdout
    res = train(run, overrides, "resume=true", "policy.steps=6")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "J-BOND finished at step 4 and its step checkpoints were deleted" in res.stderr
    assert "checkpoint.keep_optimizer" in res.stderr and "Traceback" not in res.stderr
