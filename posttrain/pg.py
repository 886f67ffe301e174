"""Policy-gradient terms for J-BOND and WARP (README, "Policy: J-BOND and WARP"): small, pure, shape-documented.

Per-token log-probs with gradient come from `losses.sequence_logprobs` (chunked, never N x V):

    lp = sequence_logprobs(hidden, weight, targets, completion_mask)   # (P*S, T)
    seq_lp = lp.sum(-1).view(P, S)                                      # log pi(y) per sample
    loss = reinforce_loss(seq_lp, rewards - leave_one_out_baseline(rewards))
"""

from __future__ import annotations

import torch


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, S): S samples per prompt -> (P, S) mean reward of the other S - 1 samples.

    >>> leave_one_out_baseline(torch.tensor([[1., 2., 3.]]))
    tensor([[2.5000, 2.0000, 1.5000]])
    """
    S = rewards.shape[-1]
    if S < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt; got {S}")
    return (rewards.sum(-1, keepdim=True) - rewards) / (S - 1)


def reinforce_loss(seq_logprob_sum: torch.Tensor, advantages: torch.Tensor, normalizer=None) -> torch.Tensor:
    """REINFORCE: -sum_i A_i log pi(y_i) / normalizer (default: the number of sequences).

    seq_logprob_sum (...) with grad: log pi(y) summed over each sample's tokens; advantages (...),
    the same shape, are constants (detached here), e.g. R - leave_one_out_baseline(R).
    """
    if seq_logprob_sum.shape != advantages.shape:
        raise ValueError(f"seq_logprob_sum {tuple(seq_logprob_sum.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have the same shape")
    normalizer = seq_logprob_sum.numel() if normalizer is None else normalizer
    return -(advantages.detach() * seq_logprob_sum).sum() / normalizer
