"""Rewards for the policy stages: a registry, deadlines that fail closed, and the built-in rewards.

    import rewards
    math = rewards.get("math", strict=True)                  # one reward: (prompts, completions, **columns)
    math(["What is 27 + 45?"], ["Answer: 72"], answer=["72"])  # -> [1.0]; math.last_metrics has sub-metrics

    combined = rewards.from_config([                          # a recipe's `rewards:` list
        {"name": "math", "weight": 1.0, "timeout_s": 10},
        {"name": "examples/my_reward.py:brevity", "weight": 0.1, "options": {"max_chars": 200}},
    ])
    out = combined.score(prompts, completions, answer=answers)
    out.total      # weighted sum per sample; None = skip the sample
    out.metrics    # reward/math/mean, reward/math/errors, reward/math/timeouts, reward/math/accuracy, ...

    @rewards.register("shouting")                             # your own reward, by name in recipes
    def shouting(prompts, completions, **columns):
        return [-1.0 if c.isupper() else 0.0 for c in completions]

Built-in names: `math` (answer extraction + Math-Verify in killable workers), `format` (the
`Answer: <x>` format), `code` (sandboxed execution of model-written Python), `safety` (refusals,
over-refusal, toxicity, PII, by hazard category). Installed packages add names through the
`posttrain.rewards` entry-point group; any file or module works as `path.py:attr` / `module:attr`.
Files: base.py (interface, deadlines, combination), workers.py (killable worker processes), registry.py
(names), math.py + math_extract.py, code.py + code_harness.py + sandbox.py + isolation.py, safety.py.
"""

import importlib

# Names load on first use (PEP 562), so a worker process that imports rewards.math never imports
# the registry, which imports posttrain, which imports torch (seconds and hundreds of MB per worker).
_EXPORTS = {
    "get": "registry", "register": "registry", "from_config": "registry", "available": "registry",
    "resolve": "registry", "REGISTRY": "registry", "ENTRY_POINT_GROUP": "registry",
    "CombinedReward": "base", "RewardScores": "base", "RewardError": "base", "RewardFn": "base",
    "WorkerPool": "workers", "Outcome": "workers", "call_with_deadline": "base", "time_left": "base",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rewards' has no attribute '{name}'")


__all__ = list(_EXPORTS)
