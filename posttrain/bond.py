"""J-BOND's objective (BOND, Sessa et al. 2024, arXiv:2407.14622): small, pure, shape-documented.

Best-of-N distills into the policy: with p(y) = P[r(y') <= r(y)] for y' ~ anchor, the Best-of-N
distribution is anchor(y) p(y)^(N-1) (ties aside). Per prompt, S policy samples y_s and k anchor
samples y'_j; then

    forward  = -log pi(best of the first N anchor samples)          (an exact BoN-N draw: SFT on it)
    backward = REINFORCE on R_s = (N-1) q(y_s) - (log pi(y_s) - log anchor(y_s)), leave-one-out baseline
    kl       = KL(pi || anchor) by its true gradient: stop-grad(log pi - log anchor) * grad log pi
    loss     = (1 - beta) forward + beta backward + gamma kl

q(y) estimates log p(y) from the k anchor samples (`quantile_reward`): the paper's rule for k = 2
("jbond": -log 16 when y is below both, else 0), or the log of the empirical quantile ("log").
Ties (0/1 verifiers make most of them) count half, or are broken by a secondary score (the WARM
reward model) first. The anchor is the policy's EMA, updated every step (merge.ema_).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .pg import leave_one_out_baseline, reinforce_loss

JBOND_PENALTY = math.log(16.0)


def wins(policy_r: torch.Tensor, anchor_r: torch.Tensor, policy_tb: torch.Tensor | None = None,
         anchor_tb: torch.Tensor | None = None) -> torch.Tensor:
    """policy_r (P, S), anchor_r (P, k) -> (P, S): anchor samples each policy sample beats, ties
    worth a half. A tie in the reward is first broken by the secondary scores (*_tb), when given."""
    diff = policy_r[:, :, None] - anchor_r[:, None, :]  # (P, S, k)
    if policy_tb is not None:
        tb = policy_tb[:, :, None] - anchor_tb[:, None, :]
        diff = torch.where(diff == 0, tb, diff)
    return (diff > 0).float().sum(-1) + 0.5 * (diff == 0).float().sum(-1)


def quantile_reward(won: torch.Tensor, k: int, rule: Literal["jbond", "log"] = "jbond") -> torch.Tensor:
    """q(y), the estimate of log p(y), from `won` (wins out of k anchor samples, ties half).

    jbond (the paper, k = 2): -log 16 when y is strictly below every anchor sample, else 0.
    log: log of the empirical quantile won / k, floored at 1 / (2k) (log 0 would be -inf).
    """
    if rule == "jbond":
        return torch.where(won == 0, -JBOND_PENALTY, 0.0)
    if rule == "log":
        return torch.log((won / k).clamp_min(1.0 / (2 * k)))
    raise ValueError(f"quantile rule must be 'jbond' or 'log'; got {rule!r}")


def best_anchor(anchor_r: torch.Tensor, n: int, anchor_tb: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) index of the best of the first n anchor samples (reward, then the secondary score;
    a remaining tie goes to the first): one Best-of-n draw from the anchor per prompt."""
    r = anchor_r[:, :n]
    if anchor_tb is None:
        return r.argmax(-1)
    top = r == r.max(-1, keepdim=True).values  # the tie-break only orders the best rewards
    return torch.where(top, anchor_tb[:, :n].double(), -math.inf).argmax(-1)


def jbond_loss(policy_lp: torch.Tensor, policy_anchor_lp: torch.Tensor, best_lp: torch.Tensor,
               q: torch.Tensor, *, n: int = 2, beta: float = 0.5, gamma: float = 0.0,
               normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The J-BOND loss of one batch of prompts.

    policy_lp (P, S): log pi(y_s), summed over each sample's tokens, WITH grad.
    policy_anchor_lp (P, S): log anchor(y_s), no grad.
    best_lp (P,): log pi(best anchor sample) WITH grad.
    q (P, S): quantile_reward of each policy sample.
    normalizer: the number of prompts the step's loss is averaged over (default P; distributed
    callers pass the global count divided as the engine averages).
    """
    P, S = policy_lp.shape
    norm = float(P) if normalizer is None else normalizer
    log_ratio = (policy_lp - policy_anchor_lp).detach()
    ret = (n - 1) * q - log_ratio
    backward = reinforce_loss(policy_lp, ret - leave_one_out_baseline(ret), normalizer=norm * S)
    forward = -best_lp.sum() / norm
    kl = reinforce_loss(policy_lp, -log_ratio, normalizer=norm * S)  # grad = E[log ratio * grad log pi]
    loss = (1 - beta) * forward + beta * backward + gamma * kl
    stats = {"forward": float(forward.detach()), "backward": float(backward.detach()), "kl": float(log_ratio.mean()),
             "return": float(ret.mean()), "quantile_reward": float(q.mean())}
    return loss, stats


__all__ = ["wins", "quantile_reward", "best_anchor", "jbond_loss", "JBOND_PENALTY"]
