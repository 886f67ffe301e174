"""Paired comparisons of two evaluations on the same problems: the difference and its bootstrap interval.

    >>> r = paired_interval([0, 1, 0, 1], [1, 1, 0, 1], seed=0)
    >>> r["before"], r["after"], r["diff"]
    (0.5, 0.75, 0.25)

The policy stage scores every held-out problem before and after training with the same problems and the
same sampling seeds, so each problem gives one difference d_i = after_i - before_i (its score: 0/1, or
the mean of its samples). The mean difference is the measured gain; its 95 % interval is the percentile
bootstrap over problems (Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13):
resample the n problems with replacement `samples` times and take the 2.5th and 97.5th percentiles of
the resampled mean differences. Pairing removes the problems' own difficulty from the noise: a problem
the model solves both times, or never, adds nothing to the interval's width.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_interval(before: Sequence[float], after: Sequence[float], *, level: float = 0.95,
                    samples: int = 10_000, seed: int = 0) -> dict:
    """The paired difference of two per-problem score lists (same problems, same order) and its
    percentile-bootstrap interval at `level`: {n, before, after, diff, lo, hi, se, level}."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired_interval needs two equal-length lists of per-problem scores, got "
                         f"{b.shape} and {a.shape}")
    if len(b) == 0:
        raise ValueError("paired_interval needs at least one problem")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # 1000 resamples at a time: n x 1000 indices in memory
        idx = rng.integers(0, len(d), size=(min(1000, samples - start), len(d)))
        means[start:start + len(idx)] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"n": int(len(d)), "before": float(b.mean()), "after": float(a.mean()), "diff": float(d.mean()),
            "lo": float(lo), "hi": float(hi), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
            "level": level}


def format_interval(r: dict) -> str:
    """'+0.047 [+0.021, +0.074]' (the difference and its interval)."""
    return f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"


__all__ = ["paired_interval", "format_interval"]
