"""WARP (Ramé et al. 2024, arXiv:2406.16768; README "Policy"): RL runs from a shared init, SLERP, LITI, iterated.

    result = warp(init, run_rl, evaluate, runs=2, iterations=2, liti_eta=0.3, reduce=all_reduce_sum)
    front = eta_sweep(result.last_init, result.last_merged, [0.1, 0.3, 0.5, 1.0], evaluate)

- `run_rl(init, run, iteration) -> state`: one RL run from `init` (the caller's trainer: REINFORCE
  with a leave-one-out baseline on r - beta (log pi - log ema), `warp_loss` below, the EMA anchor
  starting at init and updated every step with rate mu). Runs differ by seed and prompt order.
- The M final states are merged by SLERP of their task vectors (merge.slerp_many), then
  LITI: next init = (1 - eta) init + eta merged.
- `evaluate(state, init) -> dict` (reward, KL to the iteration's init, ...) is called on the init,
  every run's result, the merge and the LITI result, so each stage of each iteration is reported.
States are dicts of the tensors (or ZeRO-3 partitions) this rank holds; `reduce` sums SLERP's
partial dot products over ranks (merge.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .merge import Reduce, State, liti, slerp_many
from .pg import leave_one_out_baseline, reinforce_loss


def warp_loss(policy_lp: torch.Tensor, anchor_lp: torch.Tensor, rewards: torch.Tensor, *, beta: float,
              normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One RL step's loss: REINFORCE, leave-one-out baseline, on R = r - beta (log pi - log ema).

    policy_lp (P, S) log pi(y) per sample WITH grad; anchor_lp (P, S) the EMA anchor's; rewards (P, S).
    normalizer: prompts the loss is averaged over (default P)."""
    P, S = policy_lp.shape
    log_ratio = (policy_lp - anchor_lp).detach()
    ret = rewards - beta * log_ratio
    norm = float(P) if normalizer is None else normalizer
    loss = reinforce_loss(policy_lp, ret - leave_one_out_baseline(ret), normalizer=norm * S)
    return loss, {"kl_to_anchor": float(log_ratio.mean()), "return": float(ret.mean())}


class WarpResult(NamedTuple):
    state: State            # the last LITI result: the policy WARP hands on
    history: list[dict]     # one row per (iteration, stage), as reported
    last_init: State        # the last iteration's init and SLERP merge: eta_sweep traces their front
    last_merged: State


def warp(init: State, run_rl: Callable[[State, int, int], State], evaluate: Callable[[State, State], dict], *,
         runs: int, iterations: int, liti_eta: float, reduce: Reduce | None = None,
         log: Callable[[dict], None] | None = None) -> WarpResult:
    """I iterations of (M runs -> SLERP -> LITI).

    `evaluate(state, init)` gets the state and the iteration's init (for the KL to it); each history
    row is {"iteration", "stage" ("init", "run_<m>", "slerp", "liti"), **evaluate(...)}, passed to
    `log` as it comes (wandb / metrics.jsonl). The caller checkpoints inside run_rl."""
    history: list[dict] = []
    merged = init
    for it in range(1, iterations + 1):
        def report(stage: str, state: State, base: State = init) -> None:  # base: this iteration's init
            row = {"iteration": it, "stage": stage, **evaluate(state, base)}
            history.append(row)
            if log:
                log(row)

        report("init", init)
        finals = []
        for m in range(runs):
            finals.append(run_rl(init, m, it))
            report(f"run_{m}", finals[-1])
        merged = slerp_many(init, finals, reduce=reduce)
        report("slerp", merged)
        previous, init = init, liti(init, merged, liti_eta)
        report("liti", init)
    return WarpResult(init, history, previous, merged)


def eta_sweep(init: State, merged: State, etas: list[float], evaluate: Callable[[State, State], dict]) -> list[dict]:
    """The reward/KL front of the final merge: evaluate((1 - eta) init + eta merged, init) per eta."""
    return [{"eta": eta, **evaluate(liti(init, merged, eta), init)} for eta in etas]


__all__ = ["warp_loss", "warp", "eta_sweep", "WarpResult"]
