"""The distill stage through train.py, as users run it: real processes, DeepSpeed on CPU (gloo).

- 2 ranks with ZeRO-3 give the loss curve of 1 rank with the same global batch (2 x 1 micro-batches
  vs 1 x 2 accumulated), and hold about half the parameter + optimizer state per rank;
- a run killed with SIGKILL after a checkpoint and resumed gives the same losses and bit-identical
  final weights as a straight run; SIGTERM writes a checkpoint and exits 0; a finished stage says so;
  a half-written checkpoint (a kill during a save) leaves the previous one in use;
- the wandb offline run holds the logged metrics, read back from its files.
The model is the smoke recipe's tiny random Gemma 3 (17M parameters, most of them the embedding).
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

from posttrain.tracking import offline_history

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
BASE = ["recipe=smoke", "stages=[distill]", f"distill.steps={STEPS}", "distill.warmup_steps=1",
        "distill.eval_every=0", "data.eval=null", "checkpoint.every=2", "checkpoint.keep_optimizer=true",
        "tracking.log_every=1"]


def train(run_dir: Path, *overrides: str, ranks: int = 1, timeout: float = 300, wait: bool = True):
    res = train_py([*BASE, f"run_dir={run_dir}", *overrides], ranks=ranks, wait=wait, timeout=timeout)
    if wait:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(run_dir: Path) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run logs again the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "smoke" / "distill" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "smoke" / "distill" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    train(run)
    return run


def test_two_ranks_zero3_match_one_rank_and_halve_the_state(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, "distill.steps=3", "data.grad_accum=2")
    train(two, "distill.steps=3", ranks=2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:  # same micro-batches, same targets: only the order of float sums differs
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-3), step
    ratio = b[3]["state_gb"] / a[3]["state_gb"]  # rank 0's parameters, gradients and Adam states
    assert 0.4 < ratio < 0.6, (a[3]["state_gb"], b[3]["state_gb"])


def test_bf16_autocast_trains_close_to_float32(straight, tmp_path):
    """distributed.autocast=bf16: the forward runs in bf16 over float32 weights (the logits of the
    chunked loss stay float32); the curve follows float32's within bf16 rounding."""
    train(tmp_path, "distributed.autocast=bf16")
    mixed, full = losses(tmp_path), losses(straight)
    assert sorted(mixed) == sorted(full)
    for step in mixed:
        assert mixed[step]["loss"] == pytest.approx(full[step]["loss"], rel=2e-3), step
    assert mixed[1]["loss"] != full[1]["loss"], "autocast changed nothing: is it applied?"


def test_resume_after_sigkill_is_exact(straight, tmp_path):
    proc = train(tmp_path, wait=False)
    ckpt = tmp_path / "smoke" / "distill" / "checkpoints" / "step_4"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stdout.read()[-3000:]
    assert not (tmp_path / "smoke" / "distill" / "final").exists()  # killed before the end
    train(tmp_path, "resume=true")
    a, b = losses(straight), losses(tmp_path)
    assert [a[s]["loss"] for s in range(1, STEPS + 1)] == [b[s]["loss"] for s in range(1, STEPS + 1)]
    wa, wb = final_weights(straight), final_weights(tmp_path)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact on CPU


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(straight, tmp_path):
    proc = train(tmp_path, "checkpoint.every=0", wait=False)
    metrics = tmp_path / "smoke" / "distill" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while (not metrics.exists() or '"loss"' not in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved step" in out
    ckpts = sorted((tmp_path / "smoke" / "distill" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and 1 <= int(ckpts[0].name.split("_")[1]) < STEPS, ckpts
    train(tmp_path, "resume=true", "checkpoint.every=0")
    a, b = losses(straight), losses(tmp_path)
    assert [a[s]["loss"] for s in range(1, STEPS + 1)] == [b[s]["loss"] for s in range(1, STEPS + 1)]


def test_finished_stage_says_so_and_a_half_written_checkpoint_is_ignored(straight):
    ckpts = straight / "smoke" / "distill" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_4", "step_6"]  # keep: 2
    (ckpts / "step_8.partial").mkdir()  # a save killed half-way: never named by `latest`
    res = train(straight, "resume=true")
    assert f"already finished: it trained step {STEPS} of {STEPS}" in res.stdout
    res = train(straight, "resume=true", "distill.steps=8")  # continues from step_6, not the partial one
    assert sorted(losses(straight)) == list(range(1, 9))
    assert (ckpts / "latest").read_text() == "step_8"


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    train(tmp_path, "distill.steps=2", "tracking.wandb=true", "tracking.mode=offline")
    runs = list((tmp_path / "smoke" / "distill" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = [r for r in offline_history(runs[0]) if "loss" in r]
    logged = losses(tmp_path)
    assert [round(r["loss"], 6) for r in history] == [round(logged[s]["loss"], 6) for s in (1, 2)]
    assert {"lr", "grad_norm", "tokens_per_s", "memory_gb"} <= set(history[0])


def test_on_policy_distillation_samples_from_the_sharded_student(tmp_path):
    # ZeRO-3 partitions the student even on one rank: rollouts gather its weights once per batch.
    res = train(tmp_path, "distill.steps=2", "distill.method=on_policy", "distill.max_new_tokens=6")
    logged = losses(tmp_path)
    assert sorted(logged) == [1, 2] and all(0 < r["loss_tokens"] <= 6 * 2 for r in logged.values())
    assert "held-out" not in res.stdout  # data.eval=null in these runs


def test_sequence_parallel_two_ranks_match_one_rank(tmp_path):
    """distributed.sequence_parallel=2 on 2 ranks: one data-parallel replica whose two ranks each hold half
    of every row (47 tokens, padded to 48), so the run sees the 1-rank run's batches. topk targets are
    deterministic, so losses, gradient norms and the held-out KL before and after must agree."""
    common = ("distill.steps=3", "distill.method=topk", "distill.top_k=16", "data.max_seq_len=47",
              "data.eval=arithmetic_eval", "distill.eval_batches=2", "distributed.zero_stage=3")
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, *common)
    res = train(two, *common, "distributed.sequence_parallel=2", ranks=2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3], res.stdout[-2000:]
    for step in a:
        assert a[step]["loss_tokens"] == b[step]["loss_tokens"], step  # each loss token counted once
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step
    sa, sb = (json.loads((r / "smoke" / "distill" / "summary.json").read_text()) for r in (one, two))
    for when in ("before", "after"):
        assert sa[when]["eval/tokens"] == sb[when]["eval/tokens"] > 0, when
        for key in ("eval/kl", "eval/top1", "eval/reply_start_top1"):
            assert sa[when][key] == pytest.approx(sb[when][key], rel=1e-5, abs=1e-6), (when, key)
    wa, wb = final_weights(one), final_weights(two)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
