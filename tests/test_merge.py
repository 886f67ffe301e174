"""Weight arithmetic (posttrain/merge.py): EMA, SLERP of task vectors, iterated merges, LITI.

Small random float32 states with a 1-D, a 2-D and a 3-D tensor (odd sizes, so the simulated
ZeRO-3 shards need padding). Distributed reduction is simulated with two threads whose `reduce`
is a sum all-reduce, each calling the function on its own half of every tensor.
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from posttrain.merge import (
    angles,
    check_compatible,
    ema_,
    lerp,
    liti,
    slerp,
    slerp_many,
    task_vectors,
    uniform_average,
)

SHAPES = {"bias": (7,), "proj.weight": (3, 5), "conv": (2, 3, 3)}
TOL = {"rtol": 1e-6, "atol": 1e-6}


def rand_state(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def add(init: dict, deltas: dict) -> dict:
    return {k: init[k] + deltas[k] for k in init}


def delta(state: dict, init: dict) -> dict:
    return {k: state[k] - init[k] for k in init}


def norms(state: dict) -> torch.Tensor:
    return torch.stack([state[k].norm() for k in sorted(state)])


def assert_states_close(x: dict, y: dict, **tol) -> None:
    assert x.keys() == y.keys()
    for k, v in x.items():
        torch.testing.assert_close(v, y[k], **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


def equal_norm_pair(seed: int) -> tuple[dict, dict]:
    """Two random task vectors with |d1| == |d2| per tensor, not parallel."""
    d1, d2 = rand_state(seed), rand_state(seed + 1)
    return d1, {k: d2[k] * (d1[k].norm() / d2[k].norm()) for k in d1}


def orthonormal_deltas(m: int, scale: float, seed: int) -> list[dict]:
    """m mutually orthogonal task vectors per tensor, each of norm `scale` (QR of a random matrix)."""
    g = torch.Generator().manual_seed(seed)
    out = [{} for _ in range(m)]
    for k, s in SHAPES.items():
        q, _ = torch.linalg.qr(torch.randn(math.prod(s), m, generator=g, dtype=torch.float64))
        for i in range(m):
            out[i][k] = (scale * q[:, i]).reshape(s).float()
    return out


# ----- EMA -----

def test_ema_matches_formula_in_place():
    anchor, policy = rand_state(0), rand_state(1)
    before = {k: v.clone() for k, v in anchor.items()}
    ptrs = {k: v.data_ptr() for k, v in anchor.items()}
    ema_(anchor, policy, 0.3)
    for k in anchor:
        assert anchor[k].data_ptr() == ptrs[k]
        torch.testing.assert_close(anchor[k], 0.7 * before[k] + 0.3 * policy[k], **TOL)


def test_ema_rate_endpoints():
    anchor, policy = rand_state(0), rand_state(1)
    before = {k: v.clone() for k, v in anchor.items()}
    ema_(anchor, policy, 0.0)
    assert all(torch.equal(anchor[k], before[k]) for k in anchor)
    ema_(anchor, policy, 1.0)
    assert all(torch.equal(anchor[k], policy[k]) for k in anchor)


def test_ema_bf16_anchor():
    anchor, policy = rand_state(0, torch.bfloat16), rand_state(1, torch.bfloat16)
    expected = {k: (0.5 * anchor[k].float() + 0.5 * policy[k].float()).bfloat16() for k in anchor}
    ema_(anchor, policy, 0.5)
    for k in anchor:
        assert anchor[k].dtype == torch.bfloat16
        torch.testing.assert_close(anchor[k], expected[k], rtol=1e-2, atol=1e-2)
        assert not torch.equal(anchor[k], policy[k])


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_ema_bad_rate_raises(rate):
    with pytest.raises(ValueError, match="rate"):
        ema_(rand_state(0), rand_state(1), rate)


# ----- SLERP -----

def test_slerp_endpoints():
    init, a, b = rand_state(0), rand_state(1), rand_state(2)
    assert_states_close(slerp(init, a, b, 0.0), a, rtol=1e-5, atol=1e-5)
    assert_states_close(slerp(init, a, b, 1.0), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75])
def test_slerp_preserves_norm_where_lerp_shrinks(lam):
    init = rand_state(0)
    d1, d2 = equal_norm_pair(10)
    merged = delta(slerp(init, add(init, d1), add(init, d2), lam), init)
    lerped = {k: (1 - lam) * d1[k] + lam * d2[k] for k in d1}
    torch.testing.assert_close(norms(merged), norms(d1), rtol=1e-5, atol=1e-5)
    assert (norms(lerped) < norms(d1) - 1e-3).all(), "lerp should shrink non-parallel task vectors"


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_slerp_parallel_is_lerp(factor):
    init, d1 = rand_state(0), rand_state(1)
    a, b = add(init, d1), add(init, {k: factor * v for k, v in d1.items()})
    out = slerp(init, a, b, 0.3)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert_states_close(out, lerp(a, b, 0.3), rtol=1e-5, atol=1e-5)


def test_slerp_zero_and_antiparallel_task_vectors_lerp():
    init, d1 = rand_state(0), rand_state(1)
    a = add(init, d1)
    assert_states_close(slerp(init, a, init, 0.4), lerp(a, init, 0.4))
    b = add(init, {k: -v for k, v in d1.items()})
    out = slerp(init, a, b, 0.5)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert_states_close(out, lerp(a, b, 0.5), rtol=1e-5, atol=1e-5)


def test_slerp_orthogonal_coefficients():
    # Disjoint supports make d1 and d2 exactly orthogonal; the same values make the norms equal.
    init = rand_state(0)
    d1, d2 = {}, {}
    for k, v in rand_state(1).items():
        flat = v.reshape(-1).clone()
        half = flat.numel() // 2
        first, second = flat.clone(), torch.zeros_like(flat)
        first[half:] = 0
        second[flat.numel() - half:] = flat[:half].flip(0)
        d1[k], d2[k] = first.reshape(v.shape), second.reshape(v.shape)
    c = math.sin(math.radians(45)) / math.sin(math.radians(90))
    out = slerp(init, add(init, d1), add(init, d2), 0.5)
    assert_states_close(out, {k: init[k] + c * d1[k] + c * d2[k] for k in init})
    assert all(abs(w - 90.0) < 1e-4 for w in angles(init, add(init, d1), add(init, d2)).values())


def test_angles_parallel_and_antiparallel():
    init, d = rand_state(0), rand_state(1)
    same = angles(init, add(init, d), add(init, {k: 3 * v for k, v in d.items()}))
    opposite = angles(init, add(init, d), add(init, {k: -v for k, v in d.items()}))
    assert same.keys() == opposite.keys() == SHAPES.keys()
    assert all(w < 0.1 for w in same.values()) and all(w > 179.9 for w in opposite.values())


def test_slerp_dtypes():
    init, a, b = rand_state(0, torch.bfloat16), rand_state(1, torch.bfloat16), rand_state(2, torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in slerp(init, a, b).values())
    init, a, b = rand_state(0, torch.float64), rand_state(1, torch.float64), rand_state(2, torch.float64)
    out = slerp(init, a, b, 0.0)
    assert all(out[k].dtype == torch.float64 and torch.allclose(out[k], a[k], rtol=1e-12, atol=1e-12)
               for k in out)


def test_slerp_bad_lambda_raises():
    init, a, b = rand_state(0), rand_state(1), rand_state(2)
    with pytest.raises(ValueError, match="lam"):
        slerp(init, a, b, 1.2)


# ----- M > 2 -----

def test_slerp_many_two_is_slerp_half():
    init, a, b = rand_state(0), rand_state(1), rand_state(2)
    assert_states_close(slerp_many(init, [a, b]), slerp(init, a, b, 0.5))


def test_slerp_many_three_is_two_step_iteration():
    init, a, b, c = rand_state(0), rand_state(1), rand_state(2), rand_state(3)
    expected = slerp(init, slerp(init, a, b, 1 / 2), c, 1 / 3)
    assert_states_close(slerp_many(init, [a, b, c]), expected, rtol=1e-5, atol=1e-5)


def test_slerp_many_one_is_a_copy():
    init, a = rand_state(0), rand_state(1)
    out = slerp_many(init, [a])
    assert_states_close(out, a, rtol=0, atol=0)
    assert all(out[k].data_ptr() != a[k].data_ptr() for k in a)


@pytest.mark.parametrize("m", [3, 4])
def test_slerp_many_preserves_norm_of_orthogonal_runs(m):
    init = rand_state(0)
    deltas = orthonormal_deltas(m, scale=2.5, seed=m)
    merged = delta(slerp_many(init, [add(init, d) for d in deltas]), init)
    torch.testing.assert_close(norms(merged), torch.full((len(SHAPES),), 2.5), rtol=1e-5, atol=1e-5)
    # Orthogonal runs: every step is a 90-degree SLERP, so run m enters with sin(90/m degrees) and
    # the earlier ones are scaled by sin(90 (1 - 1/m) degrees); 1/m is a share of the angle.
    coefs = [1.0]
    for j in range(2, m + 1):
        keep, new = math.sin(math.radians(90 * (1 - 1 / j))), math.sin(math.radians(90 / j))
        coefs = [c * keep for c in coefs] + [new]
    parts = torch.stack([torch.stack([(merged[k] * d[k]).sum() / 2.5**2 for k in sorted(SHAPES)])
                         for d in deltas])
    torch.testing.assert_close(parts, torch.tensor(coefs)[:, None].expand_as(parts), rtol=1e-5, atol=1e-5)
    assert coefs[-1] < coefs[0], "the last run gets less than the first: not a uniform average"


# ----- sharded == whole -----

def shard(state: dict, rank: int, world: int) -> dict:
    """Rank's flat slice of every tensor, zero-padded at the end to a multiple of world (ZeRO-3)."""
    out = {}
    for k, v in state.items():
        flat = v.reshape(-1)
        per = -(-flat.numel() // world)
        padded = torch.cat([flat, flat.new_zeros(per * world - flat.numel())])
        out[k] = padded[rank * per:(rank + 1) * per].clone()
    return out


def run_ranks(fn, world: int):
    """fn(rank, reduce) on `world` threads; reduce sums its tensor over them (an all-reduce stand-in).

    Returns the results by rank and how many times each rank called reduce."""
    barrier = threading.Barrier(world, timeout=30)
    box, calls = [None] * world, [0] * world

    def reduce_for(rank):
        def reduce(t):
            calls[rank] += 1
            box[rank] = t.clone()
            barrier.wait()
            total = torch.stack(box).sum(0)
            barrier.wait()  # nobody overwrites box before all have summed
            return total
        return reduce

    with ThreadPoolExecutor(world) as pool:
        results = list(pool.map(lambda r: fn(r, reduce_for(r)), range(world)))
    return results, calls


def unshard(shards: list[dict], like: dict) -> dict:
    return {k: torch.cat([s[k] for s in shards])[:v.numel()].reshape(v.shape) for k, v in like.items()}


def test_sharded_slerp_equals_whole():
    init, a, b = rand_state(0), rand_state(1), rand_state(2)
    results, calls = run_ranks(
        lambda r, reduce: slerp(shard(init, r, 2), shard(a, r, 2), shard(b, r, 2), 0.3, reduce=reduce), 2)
    assert calls == [1, 1]
    for k, v in init.items():  # the padding stays zero
        assert torch.equal(results[1][k][v.numel() - results[0][k].numel():], torch.zeros(
            2 * results[0][k].numel() - v.numel()))
    assert_states_close(unshard(results, init), slerp(init, a, b, 0.3))


def test_sharded_slerp_many_and_angles_equal_whole():
    init, states = rand_state(0), [rand_state(i) for i in (1, 2, 3)]
    results, calls = run_ranks(
        lambda r, reduce: slerp_many(shard(init, r, 2), [shard(s, r, 2) for s in states], reduce=reduce), 2)
    assert calls == [2, 2]
    assert_states_close(unshard(results, init), slerp_many(init, states), rtol=1e-5, atol=1e-6)
    results, _ = run_ranks(
        lambda r, reduce: angles(shard(init, r, 2), shard(states[0], r, 2), shard(states[1], r, 2),
                                 reduce=reduce), 2)
    whole = angles(init, states[0], states[1])
    assert results[0] == results[1]
    assert all(abs(results[0][k] - whole[k]) < 1e-4 for k in whole)


def test_replicated_tensors_summed_over_ranks_give_same_slerp():
    # Every rank holding the whole tensor: reduce doubles all sums, the angle is unchanged.
    init, a, b = rand_state(0), rand_state(1), rand_state(2)
    doubled = slerp(init, a, b, 0.3, reduce=lambda t: 2 * t)
    assert_states_close(doubled, slerp(init, a, b, 0.3))


# ----- LITI, averages, task vectors, compatibility -----

def test_liti():
    init, merged = rand_state(0), rand_state(1)
    assert_states_close(liti(init, merged, 0.0), init, rtol=0, atol=0)
    assert_states_close(liti(init, merged, 1.0), merged, rtol=0, atol=0)
    assert_states_close(liti(init, merged, 0.3), {k: 0.7 * init[k] + 0.3 * merged[k] for k in init})
    with pytest.raises(ValueError, match="eta"):
        liti(init, merged, 1.1)


def test_uniform_average_and_task_vectors():
    states = [rand_state(i) for i in range(3)]
    assert_states_close(uniform_average(states), {k: (states[0][k] + states[1][k] + states[2][k]) / 3
                                                  for k in SHAPES})
    init = rand_state(9)
    vectors = task_vectors(init, states)
    assert len(vectors) == 3
    for s, v in zip(states, vectors):
        assert_states_close(v, delta(s, init))


def test_mismatched_keys_raise_naming_the_key():
    a, b = rand_state(0), rand_state(1)
    b["extra.weight"] = b.pop("bias")
    with pytest.raises(ValueError, match="'bias'"):
        uniform_average([a, b])
    with pytest.raises(ValueError, match="'bias'"):
        check_compatible([a, b], "test")


def test_mismatched_shape_and_dtype_raise_naming_the_key():
    a, b = rand_state(0), rand_state(1)
    b["proj.weight"] = b["proj.weight"].reshape(5, 3)
    with pytest.raises(ValueError, match=r"'proj\.weight'.*\(5, 3\)"):
        slerp(rand_state(2), a, b)
    c = rand_state(1)
    c["conv"] = c["conv"].double()
    with pytest.raises(ValueError, match="'conv'"):
        check_compatible([a, c], "test")
    check_compatible([a, rand_state(3)], "test")  # compatible: no error
