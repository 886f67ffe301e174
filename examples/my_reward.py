"""A custom reward in a file of your own, plugged in from a recipe without touching the framework.

    rewards:
      - {name: math, weight: 1.0}
      - {name: examples/my_reward.py:brevity, weight: 0.2, options: {max_chars: 120}}
      - {name: examples/my_reward.py:MentionsUnits, weight: 0.1, timeout_s: 2, options: {units: [cm, kg]}}

A reward is a function (options are keyword parameters) or a class (options go to __init__):
called with the batch's prompts, completions and dataset columns, it returns one float per
completion, or None to skip that sample. tests/test_rewards_registry.py runs this file.
"""

from __future__ import annotations

import re


def brevity(prompts: list[str], completions: list[str], max_chars: int = 200, **columns) -> list[float]:
    """1.0 up to `max_chars` characters, falling linearly to 0.0 at twice that.

        >>> brevity(["q", "q"], ["short", "x" * 300], max_chars=200)
        [1.0, 0.5]
    """
    return [max(0.0, min(1.0, 2.0 - len(c) / max_chars)) for c in completions]


class MentionsUnits:
    """1.0 if the completion names one of `units`; None (skip) where the `needs_units` column is False.

    A class keeps state between calls and may report sub-metrics in `last_metrics`.
    """

    def __init__(self, units: list[str] = ("cm", "m", "kg")):
        self.units = tuple(units)
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts: list[str], completions: list[str], needs_units=None, **columns) -> list[float | None]:
        needs_units = needs_units or [True] * len(completions)
        scores = [float(any(re.search(rf"\b{re.escape(u)}\b", c) for u in self.units)) if need else None
                  for c, need in zip(completions, needs_units)]
        self.last_metrics = {"hit_rate": sum(s for s in scores if s) / len(scores) if scores else 0.0}
        return scores
