"""Weight arithmetic for the policy stage: EMA anchor, lerp, averages, task-vector SLERP, LITI.

    ema_(anchor, policy, rate=0.01)                       J-BOND / WARP anchor, in place
    merged = slerp_many(init, [theta_1, ..., theta_M], reduce=all_reduce_sum)   WARP merge
    next_init = liti(init, merged, eta=0.3)               WARP LITI (Ramé et al. 2024, arXiv:2406.16768)

A state is `dict[str, Tensor]`. Under DeepSpeed ZeRO-3 each rank holds a flat 1-D partition of
each parameter (zero-padded at the end), so everything here works tensor by tensor, element-wise,
on whatever the rank holds; no model is ever gathered. The only whole-tensor quantities, the dot
products and norms behind the SLERP angle, are summed locally and passed through `reduce`, which
a distributed caller sets to an all-reduce sum (one call per SLERP step):

    def all_reduce_sum(t): dist.all_reduce(t); return t

Summing over ranks is right for tensors every rank holds whole too: each sum is then multiplied by
the world size, and the angle depends only on dot / (|d1| |d2|), where the factor cancels. The
ZeRO-3 padding is zero in every state, so its task vectors are zero and add nothing. Ranks must
hold the same keys (an empty partition is fine); rows are reduced in sorted key order.

Math runs in float32 (float64 for float64 inputs); results come back in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import UserError

__all__ = [
    "State", "Reduce", "check_compatible", "ema_", "lerp", "uniform_average", "task_vectors",
    "slerp", "slerp_many", "liti", "angles",
]

State = dict[str, Tensor]
Reduce = Callable[[Tensor], Tensor]  # sums a tensor over ranks and returns it; identity on one process


def _dtype(t: Tensor) -> torch.dtype:
    # bf16 cannot hold the small differences that task vectors and EMA steps are made of.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} ({value}) must be in [0, 1] (fix: pass a fraction, e.g. 0.3)")


def check_compatible(states: list[State], what: str) -> None:
    """Raise `UserError` (a ValueError) unless all states share keys, shapes and float dtypes.

    `what` names the call in the message, e.g. "slerp(init, a, b)".
    """
    if not states:
        raise UserError(f"{what}: no states given (fix: pass at least one state dict)")
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        missing, extra = set(ref) - set(state), set(state) - set(ref)
        if missing or extra:
            key = min(missing | extra)
            where = (f"state 0 has '{key}' and state {i} does not" if key in missing
                     else f"state {i} has '{key}' and state 0 does not")
            raise UserError(f"{what}: {where} ({len(missing | extra)} key(s) differ) (fix: merge "
                            f"states of the same model with the same parameter names)")
        for key, t in ref.items():
            u = state[key]
            if u.shape != t.shape or u.dtype != t.dtype:
                raise UserError(
                    f"{what}: '{key}' is {tuple(u.shape)} {u.dtype} in state {i} but {tuple(t.shape)} "
                    f"{t.dtype} in state 0 (fix: same model and dtype in every state; under ZeRO-3 "
                    f"pass each rank's own shards, partitioned the same way)")
    for key, t in ref.items():
        if not t.is_floating_point():
            raise UserError(f"{what}: '{key}' has dtype {t.dtype}, weight arithmetic needs floating "
                            f"point (fix: pass parameters only, not integer buffers)")


@torch.no_grad()
def ema_(anchor: State, policy: State, rate: float) -> None:
    """In place: anchor <- (1 - rate) * anchor + rate * policy, rate in [0, 1].

    A bf16 anchor is updated in float32 and rounded back; a step smaller than half a bf16 ulp of
    the anchor is then lost, so keep the anchor in float32 when rate is small (0.01).
    """
    _check_unit("rate", rate)
    check_compatible([anchor, policy], "ema_(anchor, policy)")
    for key, a in anchor.items():
        dt = _dtype(a)
        if a.dtype == dt:
            a.lerp_(policy[key], rate)  # exact at rate 0 and 1
        else:
            a.copy_(a.to(dt).lerp_(policy[key].to(dt), rate))


@torch.no_grad()
def lerp(a: State, b: State, t: float) -> State:
    """(1 - t) * a + t * b per tensor; t outside [0, 1] extrapolates."""
    check_compatible([a, b], "lerp(a, b)")
    return {k: torch.lerp(x.to(_dtype(x)), b[k].to(_dtype(x)), t).to(x.dtype) for k, x in a.items()}


@torch.no_grad()
def uniform_average(states: list[State]) -> State:
    """(1 / M) * sum_m theta_m per tensor, summed in float64 (WARM's average of M reward models)."""
    check_compatible(states, "uniform_average(states)")
    out = {}
    for key, t in states[0].items():
        total = torch.zeros_like(t, dtype=torch.float64)
        for s in states:
            total += s[key].double()
        out[key] = (total / len(states)).to(t.dtype)
    return out


@torch.no_grad()
def task_vectors(init: State, states: list[State]) -> list[State]:
    """d_m = theta_m - init per tensor, one state per run (in the input dtype)."""
    check_compatible([init, *states], "task_vectors(init, states)")
    return [{k: (s[k].to(_dtype(t)) - t.to(_dtype(t))).to(t.dtype) for k, t in init.items()}
            for s in states]


def _omegas(init: State, a: State, b: State, reduce: Reduce | None) -> dict[str, float]:
    """Angle (radians) between a - init and b - init per tensor; 0 when either is zero.

    One (K, 3) tensor of partial sums [d1.d2, |d1|^2, |d2|^2] goes through `reduce` once.
    """
    keys = sorted(init)
    rows = []
    for key in keys:
        t, dt = init[key], _dtype(init[key])
        d1 = (a[key].to(dt) - t.to(dt)).reshape(-1)
        d2 = (b[key].to(dt) - t.to(dt)).reshape(-1)
        rows.append(torch.stack([d1 @ d2, d1 @ d1, d2 @ d2]))
    partial = torch.stack(rows).double() if rows else torch.zeros(0, 3, dtype=torch.float64)
    dot, n1, n2 = (reduce or (lambda x: x))(partial).unbind(-1)
    denom = (n1 * n2).sqrt()
    # A zero task vector has no direction: call it parallel (angle 0), which makes SLERP lerp.
    cos = torch.where(denom > 0, dot / denom.clamp(min=1e-300), 1.0).clamp(-1.0, 1.0)
    return dict(zip(keys, torch.acos(cos).tolist()))


def _slerp(init: State, a: State, b: State, lam: float, reduce: Reduce | None, eps: float) -> State:
    """slerp without checks, in the compute dtype (slerp_many keeps its running merge there)."""
    out = {}
    omegas = _omegas(init, a, b, reduce)
    for key, t in init.items():
        omega, dt = omegas[key], _dtype(t)
        sin = math.sin(omega)
        if sin < eps:  # parallel, anti-parallel or zero: the arc is undefined or a line, so lerp
            c1, c2 = 1.0 - lam, lam
        else:
            c1, c2 = math.sin((1.0 - lam) * omega) / sin, math.sin(lam * omega) / sin
        t = t.to(dt)
        out[key] = t + c1 * (a[key].to(dt) - t) + c2 * (b[key].to(dt) - t)
    return out


@torch.no_grad()
def slerp(init: State, a: State, b: State, lam: float = 0.5, *, reduce: Reduce | None = None,
          eps: float = 1e-6) -> State:
    """SLERP of the task vectors d1 = a - init, d2 = b - init, per tensor:

        init + sin((1 - lam) W) / sin W * d1 + sin(lam W) / sin W * d2,  cos W = d1.d2 / (|d1| |d2|)

    lam = 0 gives a, lam = 1 gives b. When sin W < eps (d1, d2 parallel or anti-parallel) or
    either task vector is zero, the lerp init + (1 - lam) d1 + lam d2 is used: for parallel vectors
    it is the limit of the formula; for anti-parallel ones the arc is not unique and lerp takes the
    chord, which shrinks towards init. With |d1| = |d2| SLERP keeps the norm where lerp shrinks it.
    SLERP of whole weights instead of task vectors would be almost lerp: subtracting init is the point.
    """
    _check_unit("lam", lam)
    check_compatible([init, a, b], "slerp(init, a, b)")
    return {k: v.to(init[k].dtype) for k, v in _slerp(init, a, b, lam, reduce, eps).items()}


@torch.no_grad()
def slerp_many(init: State, states: list[State], *, reduce: Reduce | None = None,
               eps: float = 1e-6) -> State:
    """Merge M >= 1 runs: merged = theta_1; for m = 2..M: merged = slerp(init, merged, theta_m, 1/m).

    The running merge stands for m - 1 runs, so the new one gets 1/m, as in a running mean: with
    lerp this is exactly the uniform average. With SLERP 1/m is a share of the angle, so the
    weights are only near-uniform (orthogonal runs, M = 3: 0.61, 0.61, 0.5 along each task vector)
    and the result depends a little on the order of the runs. `reduce` is called M - 1 times; the
    running merge stays in float32 between steps. M = 1 returns a copy of theta_1.
    """
    check_compatible([init, *states], "slerp_many(init, states)")
    if len(states) == 1:
        return {k: v.clone() for k, v in states[0].items()}
    merged = states[0]
    for m in range(2, len(states) + 1):
        merged = _slerp(init, merged, states[m - 1], 1.0 / m, reduce, eps)
    return {k: v.to(init[k].dtype) for k, v in merged.items()}


@torch.no_grad()
def liti(init: State, merged: State, eta: float) -> State:
    """LITI: (1 - eta) * init + eta * merged, eta in [0, 1]; the result is the next WARP init."""
    _check_unit("eta", eta)
    return lerp(init, merged, eta)


@torch.no_grad()
def angles(init: State, a: State, b: State, *, reduce: Reduce | None = None) -> dict[str, float]:
    """Angle in degrees between a - init and b - init per tensor, for logging (0 if either is zero).

    Calls `reduce` once, like slerp: on ZeRO-3 every rank must call it.
    """
    check_compatible([init, a, b], "angles(init, a, b)")
    return {k: math.degrees(w) for k, w in _omegas(init, a, b, reduce).items()}
