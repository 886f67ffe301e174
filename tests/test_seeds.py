"""Every seed of a run comes from seeds.derive_seed. Its values are pinned: a change to the function
changes every draw, so a run resumed under a new version would no longer continue exactly."""
from __future__ import annotations

import subprocess
import sys

import pytest

from posttrain.seeds import derive_seed


def test_derived_values_are_pinned():
    assert derive_seed(0, "distill/targets", 0) == 9197477897105158526
    assert derive_seed(0, "rl/rollout", 1, 3, 0) == 2170180394880907236
    assert derive_seed(1234, "warm/member", 1) == 7742791815422534137


def test_keys_name_separate_streams_and_fit_every_generator():
    seeds = {derive_seed(s, what, i) for s in (0, 1) for what in ("a", "b") for i in range(50)}
    assert len(seeds) == 200  # no two (seed, what, position) share a seed
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "x", 1) != derive_seed(0, "x1") and derive_seed(1, "x", 0) != derive_seed(0, "x", 1)
    with pytest.raises(TypeError, match="ints and strings"):
        derive_seed(0, 1.5)


def test_the_same_in_another_process():
    """Unlike Python's hash() of a string, which changes with PYTHONHASHSEED from process to process."""
    code = "from posttrain.seeds import derive_seed; print(derive_seed(7, 'rl/prompt_order', 2))"
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"}).stdout
        assert int(out) == derive_seed(7, "rl/prompt_order", 2)
