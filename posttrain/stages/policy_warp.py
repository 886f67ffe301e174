"""The policy stage's WARP driver (policy.algorithm warp or bond_then_warp; the algorithm is warp.py).

    summary = run_warp(cfg, base, tok, prompts, held, reward, verifier, tracker, out_dir)

M RL runs per iteration, each with its own engine, seed and prompt order and an EMA anchor (rl.py's
train_loop, and warp_step here); their final shards are merged by SLERP and LITI (warp.warp) on each rank's
shards; every stage of every iteration is evaluated (the held-out verifier, the training reward, KL to the
iteration's init); the final merge is swept over policy.eta_sweep (json, png, wandb table). A finished
run's shards are kept (iter<i>/run<m>/final_rank<r>.pt), so resume=true skips it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..engine import Engine, Frozen, Held, all_sum, barrier, default_warmup, rank, world_size, write_json_atomic
from ..model import Gemma3
from .rl import (Anchor, Prompts, decode, evaluate, keep_scored, linear_loss_step, loss_passes, paired_summary,
                 rollout, rollout_metrics, score, seq_logprobs, step_seed, train_loop)
from ..warp import eta_sweep, warp, warp_loss
from .loop import DONE, drop_checkpoints, finished


def warp_steps(cfg: Config, first: int = 0):
    """The tracker's step for each WARP record, increasing through the stage (wandb drops a record whose
    step is below one already logged): iteration `it` spans [block(it), block(it + 1)]; its init is logged
    at the start, run m's steps follow (block + m * steps + 1 ...), run m's evaluation at its last step,
    SLERP and LITI one step after the last run. `first`: the steps already used (J-BOND's, before WARP)."""
    p = cfg.policy

    def block(it: int) -> int:
        return first + (it - 1) * (p.warp_runs * p.steps + 1)

    def stage(it: int, name: str) -> int:
        if name == "init":
            return block(it)
        if name.startswith("run_"):
            return block(it) + (int(name[4:]) + 1) * p.steps
        return block(it) + p.warp_runs * p.steps + 1  # slerp, liti

    return block, stage


def warp_step(engine: Engine, anchor: Anchor, prompts: Prompts, idx: list[int], reward, cfg: Config, tok,
              seed: int) -> dict:
    p, pad = cfg.policy, tok.pad_id
    pol = rollout(engine, prompts, idx, p.samples_per_prompt, cfg, tok, seed)
    with anchor.swapped_in(engine), torch.no_grad():
        anchor_lp = seq_logprobs(engine, prompts, idx, pol, cfg, pad)
    r_pol, out_pol = score(reward, prompts, idx, decode(tok, pol))
    ok = keep_scored(r_pol)
    norm = max(all_sum([float(ok.sum())])[0], 1.0) / world_size()
    def loss_of(lp):
        keep, r, a = ok.to(lp.device), r_pol.to(lp.device), anchor_lp.to(lp.device)  # rewards: scored on the CPU
        return warp_loss(lp[keep], a[keep], r[keep], beta=p.warp_beta, normalizer=norm)

    loss, stats, info = linear_loss_step(engine, prompts, idx, pol, cfg, pad, loss_of, pol.sequence_logprobs())
    anchor.update(engine, p.warp_mu)
    return {**info, **rollout_metrics(r_pol, pol, out_pol.metrics), "loss": loss,
            **{f"warp/{k}": v for k, v in stats.items()}, "skipped_prompts": float((~ok).sum())}


def run_warp(cfg: Config, base: Gemma3, tok, prompts, held, reward, verifier, tracker, out_dir: Path,
             first_step: int = 0, safety=None) -> dict:
    """WARP from `base` (its weights are the first init); returns the summary, writes out_dir/final.
    first_step: the tracker steps already used in this stage (J-BOND's, when WARP follows it).
    safety: held-out safety prompts (data.eval_safety), their refusal rates in every evaluation."""
    import copy

    p = cfg.policy
    if (summary := finished(cfg, out_dir, p.steps, "WARP")) is not None:
        return summary
    block, stage_step = warp_steps(cfg, first_step)
    # base waits in host memory (on a GPU, a whole copy beside the runs' sharded engines would not fit a
    # large model); each engine gets its own copy on the device. On the CPU this moves nothing.
    device = base.embed_tokens.weight.device
    base.to("cpu")
    ev = Frozen(copy.deepcopy(base).to(device), cfg, like_trained=True)  # evaluates, exports: no optimizer state
    reduce = _all_reduce_sum if world_size() > 1 else None

    def run_rl(init: dict, m: int, it: int) -> dict:
        rdir = out_dir / f"iter{it}" / f"run{m}"
        final = rdir / f"final_rank{rank()}.pt"
        if cfg.resume and final.exists():
            return torch.load(final, weights_only=True)
        engine = Engine(copy.deepcopy(base).to(device), cfg, lr=p.lr, steps=p.steps, warmup_steps=default_warmup(p.steps, p.warmup_steps),
                        out_dir=rdir, grad_accum=loss_passes(cfg, p.samples_per_prompt))  # one optimizer step per rollout batch
        engine.assign_local(init)
        start, _ = engine.resume() if cfg.resume else (0, None)
        state = (engine.resumed_rank_state or {}).get("anchor")
        anchor = Anchor(engine, state or {k: v.float().clone() for k, v in init.items()})
        train_loop(f"warp_i{it}_r{m}", engine, anchor, warp_step, prompts, None, reward, verifier, cfg, tok, tracker,
                   rdir, start=start, before={}, step_offset=block(it) + m * p.steps,
                   seed_key=100 * it + m + 1, log_samples=m == 0)
        out = {k: v.detach().clone() for k, v in engine.local_shards().items()}
        rdir.mkdir(parents=True, exist_ok=True)
        torch.save(out, final)
        drop_checkpoints(cfg, rdir)  # the run's result is its shards now
        engine.close()
        return out

    def evaluate_state(state: dict, init: dict) -> dict:
        ev.assign_local(state)
        metrics, scores = evaluate(ev, held, verifier, reward, cfg, tok, per_problem=True, safety=safety)
        metrics["eval/kl_to_init"] = _kl_estimate(ev, Anchor(ev, init), held or prompts, cfg, tok)
        return {**metrics, "scores": scores}  # per-problem scores: the paired interval of the summary

    def log(row: dict) -> None:
        tracker.log({f"warp/iter{row['iteration']}/{row['stage']}/{k}": v for k, v in row.items()
                     if isinstance(v, float)}, step=stage_step(row["iteration"], row["stage"]))
        if rank() == 0:
            print(f"warp iteration {row['iteration']} {row['stage']:6s}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))

    init = {k: v.detach().clone() for k, v in ev.local_shards().items()}
    result = warp(init, run_rl, evaluate_state, runs=p.warp_runs, iterations=p.warp_iterations,
                  liti_eta=p.liti_eta, reduce=reduce, log=log)
    front = eta_sweep(result.last_init, result.last_merged, p.eta_sweep, evaluate_state)
    tracker.table("warp/eta_sweep", ["eta", "verifier", "reward", "kl_to_init"],
                  [[r["eta"], r.get("eval/verifier"), r.get("eval/reward"), r["eval/kl_to_init"]] for r in front],
                  step=block(p.warp_iterations + 1))
    ev.assign_local(result.state)
    first, last = result.history[0].get("scores", []), result.history[-1].get("scores", [])
    history = [{k: v for k, v in row.items() if k != "scores"} for row in result.history]
    front = [{k: v for k, v in row.items() if k != "scores"} for row in front]
    summary = {"history": history, "eta_sweep": front,
               "before": {k: v for k, v in history[0].items() if k.startswith("eval/")},
               "after": {k: v for k, v in history[-1].items() if k.startswith("eval/")},
               **paired_summary(first, last, cfg)}
    ev.export_final(tok, out_dir / "final", summary)
    if rank() == 0:
        write_json_atomic(out_dir / "eta_sweep.json", front)
        _plot_front(front, out_dir / "eta_sweep.png")
        write_json_atomic(out_dir / DONE, {"steps": p.steps, "summary": summary})
        if not cfg.checkpoint.keep_optimizer:  # the runs' shards: only a resume of this stage needs them
            for shard in out_dir.glob("iter*/run*/final_rank*.pt"):
                shard.unlink()
    barrier()
    ev.close()
    base.to(device)  # the caller's model, where it was
    return summary


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


@torch.no_grad()
def _kl_estimate(engine: Held, base: Anchor, prompts: Prompts, cfg: Config, tok) -> float:
    """KL(policy || base) estimated on one sampled completion per held-out prompt (this rank's share):
    the mean of (r - 1) - log r with r = base(y) / pi(y), y ~ pi. Unbiased like the mean of
    log pi(y) - log base(y) (E[r] = 1), but never negative, with less variance (Schulman, "Approximating
    KL divergence", 2020): a few prompts cannot report a negative distance."""
    size = min(cfg.policy.eval_size, len(prompts.rows))
    mine = list(range(size))[rank()::world_size()]
    idx, weight = mine or [0], float(bool(mine))
    comps = rollout(engine, prompts, idx, 1, cfg, tok, seed=step_seed(cfg, "kl_estimate"))
    lp = seq_logprobs(engine, prompts, idx, comps, cfg, tok.pad_id)
    with base.swapped_in(engine):
        lb = seq_logprobs(engine, prompts, idx, comps, cfg, tok.pad_id)
    log_r = (lb - lp).double()
    total, n = all_sum([float((log_r.exp() - 1 - log_r).sum()) * weight, float(len(idx)) * weight])
    return total / n


def _plot_front(front: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([r["eval/kl_to_init"] for r in front], [r.get("eval/reward", float("nan")) for r in front], "o-")
    for r in front:
        ax.annotate(f"eta {r['eta']}", (r["eval/kl_to_init"], r.get("eval/reward", float("nan"))))
    ax.set_xlabel("KL to the last init")
    ax.set_ylabel("held-out training reward")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["run_warp", "warp_step", "warp_steps"]
