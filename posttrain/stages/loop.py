"""The one step loop every trained stage runs, and the contract a stage keeps.

    loop = StepLoop("distill", engine, tracker, cfg, steps=d.steps, state=lambda: {"loader": ...})
    last = loop.run(step_fn, start)            # step_fn(step) -> that step's metrics

The loop owns what every stage shares: the free-disk check before the first step, the progress bar,
timing (`step_seconds`, unless the step measured its own), evaluation every `eval_every` steps
(not at the last step: the stage evaluates its result itself), logging every tracking.log_every
steps and at the last, step checkpoints (checkpoint.every, with the stage's `state` and `rank_state`)
and SIGTERM: a checkpoint, then errors.Preempted, which train.py turns into exit status 0.
A stage supplies its step function; distill, J-BOND and WARP runs (rl.train_loop) and WARM members
run through here.

A finished stage writes <stage dir>/done.json (its steps and summary); `finished` reads it back so a
resumed run skips the stage without building its engine. Its step checkpoints (model and optimizer
states) are then deleted unless checkpoint.keep_optimizer is set, which keeps them so that raising
the stage's steps and resume=true continues it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Config
from ..engine import Engine, all_sum, barrier, rank, write_json_atomic
from ..errors import UserError
from ..tracking import Tracker, progress

DONE = "done.json"
GiB = 2**30


@dataclass
class StageResult:
    """What every stage returns: the directory of the model it produced and its summary."""

    final: Path | None
    summary: dict


@dataclass
class StepLoop:
    name: str  # the progress bar's label and the name in messages
    engine: Engine
    tracker: Tracker
    cfg: Config
    steps: int
    prefix: str = ""  # put before every logged key
    step_offset: int = 0  # the tracker's step of this loop's step 0
    eval_every: int = 0
    evaluate: Callable[[], dict] | None = None
    state: Callable[[], dict] = dict  # the checkpoint's extra (data position, metrics before)
    rank_state: Callable[[], dict | None] = lambda: None  # this rank's own tensors (an EMA anchor's shards)
    postfix: tuple[str, str] = ("loss", ".4f")  # the metric in the progress bar, and its format

    def run(self, step_fn: Callable[[int], dict], start: int) -> dict:
        """Steps start..steps; returns the last step's metrics."""
        if start < self.steps:
            check_disk(self.name, self.engine, self.cfg)
        bar = progress(total=self.steps, initial=start, desc=self.name)
        last: dict = {}
        try:  # an error ends the bar's line first, so the error message starts on a line of its own
            for step in range(start, self.steps):
                t0 = time.perf_counter()
                metrics = step_fn(step)
                metrics.setdefault("step_seconds", time.perf_counter() - t0)
                done = step + 1
                if self.evaluate is not None and self.eval_every and done % self.eval_every == 0 and done < self.steps:
                    metrics |= self.evaluate()
                if done % self.cfg.tracking.log_every == 0 or done == self.steps:
                    self.tracker.log({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=self.step_offset + done)
                last = metrics
                bar.update(1)
                key, fmt = self.postfix
                if key in metrics:
                    bar.set_postfix({key: format(metrics[key], fmt)})
                stop = self.engine.stop_requested()
                if (self.engine.should_save(done) and done < self.steps) or stop:
                    self.engine.save(done, extra=self.state(), rank_state=self.rank_state())
                if stop:
                    self.engine.preempt(self.name, done, bar.close, self.tracker.finish)
        finally:
            bar.close()
        return last


# ----------------------------------------------------------------------------- finished stages

def finished(cfg: Config, out_dir: Path, steps: int, name: str) -> dict | None:
    """The summary of a stage that already ran its `steps` (resume=true), else None. Not resuming, a
    stale marker is removed (the stage starts over). A stage that finished fewer steps continues from
    its kept checkpoint, or says why it cannot."""
    marker = Path(out_dir) / DONE
    if not marker.exists():
        return None
    if not cfg.resume:
        barrier()
        if rank() == 0:
            marker.unlink(missing_ok=True)
        barrier()
        return None
    done = json.loads(marker.read_text())
    if done["steps"] >= steps:
        if rank() == 0:
            print(f"{name} already finished: it trained step {done['steps']} of {steps} ({marker}); "
                  f"nothing to do. To train more, raise its steps (with checkpoint.keep_optimizer=true); to start "
                  f"over, delete {out_dir}")
        return done["summary"]
    if not (Path(out_dir) / "checkpoints" / "latest").exists():
        raise UserError(f"{name} finished at step {done['steps']} and its step checkpoints were deleted "
                        f"(checkpoint.keep_optimizer=false), so it cannot continue to step {steps}; fix: set its "
                        f"steps back to {done['steps']}, or start a new run (another name=) from its final model")
    return None


def finish(engine: Engine, out_dir: Path, steps: int, summary: dict, state: dict | None = None,
           rank_state: dict | None = None) -> None:
    """After the stage's final model is written: mark it done and keep (checkpoint.keep_optimizer) or
    delete its step checkpoints."""
    if engine.cfg.checkpoint.keep_optimizer:
        engine.save(steps, extra={**(state or {}), "summary": summary}, rank_state=rank_state)
    if rank() == 0:
        write_json_atomic(Path(out_dir) / DONE, {"steps": steps, "summary": summary})
    drop_checkpoints(engine.cfg, out_dir)


def drop_checkpoints(cfg: Config, out_dir: Path) -> None:
    """Delete a finished run's step checkpoints, unless checkpoint.keep_optimizer (all ranks call this)."""
    barrier()
    if not cfg.checkpoint.keep_optimizer and rank() == 0:
        shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)
    barrier()


# ----------------------------------------------------------------------------- disk

def checkpoint_bytes(engine: Engine) -> tuple[int, int]:
    """(bytes of one step checkpoint over all ranks, bytes of the final model): the weights in their dtype
    and, for trained parameters, float32 master weights and Adam's two moments."""
    weights = trained = 0
    for p in engine.wrapped.parameters():
        n = getattr(p, "ds_numel", p.numel())
        weights += n * p.element_size()
        trained += n * 12 if p.requires_grad else 0
    return weights + trained, weights


def check_disk(name: str, engine: Engine, cfg: Config) -> None:
    """Stop before the first step when the run directory's disk cannot hold what the stage writes:
    checkpoint.keep step checkpoints (+ one being written) and the final model."""
    ckpt, final = checkpoint_bytes(engine)
    need = (cfg.checkpoint.keep + 1) * ckpt + final
    where = engine.out_dir
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    short = all_sum([float(free < need)])[0] > 0  # every rank stops together
    if short:
        raise UserError(f"{name} needs about {need / GiB:.1f} GiB of disk in {engine.out_dir} "
                        f"({cfg.checkpoint.keep} + 1 step checkpoints of {ckpt / GiB:.1f} GiB and a final model of "
                        f"{final / GiB:.1f} GiB); {free / GiB:.1f} GiB are free there; fix: free space, point "
                        f"run_dir= at a larger disk, or lower checkpoint.keep")


__all__ = ["StageResult", "StepLoop", "finished", "finish", "drop_checkpoints", "check_disk", "checkpoint_bytes"]
