"""One way to derive every seed of a run from the recipe's `seed`.

    derive_seed(cfg.seed, "distill/targets", global_batch)    # the teacher's draws of one micro-batch
    derive_seed(cfg.seed, "rl/rollout", run, step, rank)        # one rollout's sampling noise

The key names what the seed is for, so two uses never share a stream by accident (seed + 1 for one
thing and seed * k + 1 for another can collide), and its parts are the position in the run (step,
micro-batch, member, rank), so a resumed run derives the same seeds as one that never stopped. The
value is the first 63 bits of the SHA-256 of the key's repr: the same on every machine, Python
version and process (Python's own hash() of a string is not), and accepted by torch, numpy and random.
tests/test_seeds.py pins a few values: changing this function changes every draw of a resumed run.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *key: int | str) -> int:
    """A seed in [0, 2**63) for (seed, *key); keys are ints and strings."""
    for part in (seed, *key):
        if not isinstance(part, (int, str)) or isinstance(part, bool):
            raise TypeError(f"derive_seed keys are ints and strings, got {part!r}")
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


__all__ = ["derive_seed"]
