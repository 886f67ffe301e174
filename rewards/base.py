"""The reward interface, deadlines, fail-closed handling and the weighted combination.

A reward is any callable

    reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

with one score per completion; None means "no score for this sample" (skip it). `columns` are
the dataset's other columns, one list per column, aligned with the prompts (math reads
`answer`, safety `harmful` and `category`). A reward may also set `self.last_metrics` (a dict
of floats) during the call; the combination logs those as sub-metrics. Two keys have a fixed
meaning: `errors` and `timeouts` are the numbers of samples the reward gave None because a
check failed or ran past its own deadline (math does), and they are added to the counts below.

    >>> def length(prompts, completions, **columns):
    ...     return [min(len(c) / 100, 1.0) for c in completions]
    >>> length(["Hi"], ["Hello there"])
    [0.11]

`CombinedReward` (built by `rewards.from_config`) runs every reward of a recipe under a
deadline and sums them with weights. The rules:

- **Deadline.** Each reward call runs in its own thread; the caller waits at most `timeout_s`
  for it, then moves on and counts a timeout for every sample of the batch. Rewards run
  concurrently, so a batch costs the slowest reward, not the sum.
- **Fail closed.** A call that raises, times out, or scores NaN never turns into a silent 0: the
  samples are counted under `reward/<name>/errors` or `reward/<name>/timeouts`, logged, and
  handled per `on_error`; the last failure's message stays in `last_errors[name]`.
- **A broken contract stops at once.** A return value of the wrong length, or a score that is not a
  number or None, raises `RewardError` on the first call whatever `on_error` says: it is a bug in
  the reward, and every later call would fail the same way.
- **None in the sum.** The total of a sample is the weighted sum of its rewards. A reward with
  no score for a sample (it returned None, it raised, it timed out) decides by its `on_error`:
  `skip` (default) makes the whole sample's total None, so the trainer drops it; `zero` makes
  that reward count 0 for the sample (counted under `reward/<name>/zeroed`); `raise` raises
  `RewardError` when the call raised or timed out (a None the reward returned on purpose still
  skips). A reward with weight 0 is computed and logged but never changes the total.

Why threads for the deadline, and their limit: a thread can be abandoned but not killed, so a
reward that hangs keeps running in the background (at most one abandoned call per reward: while
it runs, later calls of that reward are refused at once and counted as timeouts, so threads never
pile up). A thread is the only way to run arbitrary user objects (a GPU judge model, open
clients) without pickling them, which processes would need. But a hang inside C code that holds
the GIL, such as a huge integer power `9**9**9**9`, freezes every thread, the waiting one
included: such work must go to processes. `WorkerPool` (workers.py) is that: long-lived worker
processes with a memory limit, killed and replaced at each task's deadline; the math reward
uses it, and a Python reward of your own that can hang in C should too (workers.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Literal, NamedTuple, Optional, Protocol, Sequence

logger = logging.getLogger("rewards")

OnError = Literal["skip", "zero", "raise"]
ON_ERROR = ("skip", "zero", "raise")


class RewardError(RuntimeError):
    """A reward failed and the recipe asked to stop (`on_error: raise`), or a worker pool broke."""


class RewardFn(Protocol):
    """What the registry returns: one score or None per completion; `last_metrics` is optional."""

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[float | None]: ...


# ----------------------------------------------------------------------------- deadlines

_call_state = threading.local()


def time_left() -> float | None:
    """Seconds left before the running reward call's deadline, or None outside a deadline.

    Rewards that fan work out (math, code) use it so they return in time instead of being
    abandoned: e.g. `pool.run(tasks, timeout_s=2, deadline_s=time_left())`.
    """
    end = getattr(_call_state, "deadline", None)
    return None if end is None else max(0.0, end - time.monotonic())


class CallResult(NamedTuple):
    status: Literal["ok", "error", "timeout"]
    scores: Optional[list]       # the raw return value when status == "ok"
    metrics: dict[str, float]    # the reward's last_metrics from this call
    error: str                   # "ExcType: message" for errors and timeouts
    seconds: float


class _Member:
    """One reward of a recipe: the callable, its settings, and its abandoned call if any."""

    def __init__(self, key: str, fn: Callable, weight: float, timeout_s: float, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.key, self.fn, self.weight, self.timeout_s, self.on_error = key, fn, weight, timeout_s, on_error
        self.inflight: threading.Thread | None = None
        self.warned = False

    def start(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> "_Pending":
        if self.inflight is not None and self.inflight.is_alive():
            return _Pending(self, None, {}, time.monotonic(), busy=True)
        box: dict[str, Any] = {}
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s

        def target() -> None:
            _call_state.deadline = deadline
            try:
                box["scores"] = self.fn(prompts, completions, **columns)
                metrics = getattr(self.fn, "last_metrics", None)
                box["metrics"] = dict(metrics) if isinstance(metrics, dict) else {}
            except BaseException as e:  # noqa: BLE001 - any failure of user code is counted, never raised here
                box["error"] = e
            finally:
                box["seconds"] = time.monotonic() - t0

        thread = threading.Thread(target=target, name=f"reward-{self.key}", daemon=True)
        thread.start()
        return _Pending(self, thread, box, t0, busy=False)


class _Pending(NamedTuple):
    member: _Member
    thread: threading.Thread | None
    box: dict
    t0: float
    busy: bool

    def wait(self) -> CallResult:
        m = self.member
        if self.busy:
            return CallResult("timeout", None, {}, f"TimeoutError: the previous call of '{m.key}' is still "
                              f"running past its {m.timeout_s:g} s deadline", 0.0)
        self.thread.join(max(0.0, self.t0 + m.timeout_s - time.monotonic()))
        if self.thread.is_alive():
            m.inflight = self.thread  # abandoned; refused until it ends
            return CallResult("timeout", None, {}, f"TimeoutError: no result within {m.timeout_s:g} s",
                              time.monotonic() - self.t0)
        if "error" in self.box:
            e = self.box["error"]
            return CallResult("error", None, {}, f"{type(e).__name__}: {e}", self.box["seconds"])
        return CallResult("ok", self.box["scores"], self.box["metrics"], "", self.box["seconds"])


def call_with_deadline(fn: Callable, prompts: list[str], completions: list[str], timeout_s: float,
                       **columns: list) -> CallResult:
    """Run one reward call under a deadline (a thread; see the module docstring for its limits)."""
    return _Member("reward", fn, 1.0, timeout_s, "skip").start(prompts, completions, columns).wait()


def _as_scores(raw: Any, n: int) -> tuple[list[float | None], int]:
    """A reward's return value -> n floats or None, and how many entries were NaN/inf (made None).

    Raises TypeError/ValueError for a wrong length or a non-number: the whole call counts as an error.
    """
    if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__"):
        raise TypeError(f"a reward must return a list of floats or None, got {type(raw).__name__}")
    if len(raw) != n:
        raise ValueError(f"a reward must return one score per completion: got {len(raw)} for {n}")
    out: list[float | None] = []
    bad = 0
    for value in raw:
        if value is None:
            out.append(None)
            continue
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()  # numpy / torch scalars
        if not isinstance(value, (int, float)):
            raise TypeError(f"a reward score must be a number or None, got {type(value).__name__}: {value!r:.80}")
        value = float(value)
        if math.isfinite(value):
            out.append(value)
        else:
            out.append(None)
            bad += 1
    return out, bad


# ----------------------------------------------------------------------------- combination

class RewardScores(NamedTuple):
    total: list[float | None]                   # weighted sum per sample; None = skip the sample
    per_reward: dict[str, list[float | None]]   # each reward's own (unweighted) scores
    metrics: dict[str, float]                   # reward/<name>/mean, .../errors, .../timeouts, sub-metrics


class CombinedReward:
    """Several rewards, each under its deadline, summed with weights (rules in the module docstring).

        combined = CombinedReward([("math", math_reward, 1.0, 10.0, "skip")])
        out = combined.score(prompts, completions, answer=answers)
        out.total       # [1.0, None, 0.0, ...]
        out.metrics     # {"reward/math/mean": 0.5, "reward/math/timeouts": 1, ...}

    Calling the object returns `score(...).total` and keeps the metrics in `last_metrics`, so a
    combined reward is itself a reward.
    """

    def __init__(self, members: Sequence[tuple[str, Callable, float, float, str]]):
        """members: (metric key, reward callable, weight, timeout_s, on_error) per reward."""
        keys = [m[0] for m in members]
        if len(set(keys)) != len(keys):
            raise ValueError(f"reward metric keys must be unique, got {keys}")
        self.members = [_Member(key, fn, float(w), float(t), on_error) for key, fn, w, t, on_error in members]
        self.last_metrics: dict[str, float] = {}
        self.last_scores: dict[str, list[float | None]] = {}
        self.last_errors: dict[str, str] = {}  # reward key -> its latest failure ("ExcType: message")

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
        out = self.score(prompts, completions, **columns)
        self.last_metrics, self.last_scores = out.metrics, out.per_reward
        return out.total

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence) -> RewardScores:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions; repeat each prompt per completion")
        for col, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column '{col}' has {len(values)} values for {n} completions")
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in columns.items()}

        pending = [m.start(prompts, completions, columns) for m in self.members]
        results = [p.wait() for p in pending]  # concurrent: each wait only spends what is left of its deadline

        total: list[float | None] = [0.0] * n
        per_reward: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        failures = []
        for m, res in zip(self.members, results):
            errors = timeouts = 0
            scores: list[float | None] = [None] * n
            status, message = res.status, res.error
            if status == "ok":
                try:
                    scores, nonfinite = _as_scores(res.scores, n)
                except (TypeError, ValueError) as e:  # the reward's contract, not a passing failure
                    raise RewardError(f"reward '{m.key}' broke the reward contract: {e}; fix: return a list of "
                                      f"{n} floats (None to skip a sample), one per completion") from None
                errors += nonfinite
                if nonfinite:
                    message = f"{nonfinite} score(s) were NaN or infinite"
            if status == "error":
                errors += n
            elif status == "timeout":
                timeouts += n
            else:
                errors += int(res.metrics.get("errors", 0))
                timeouts += int(res.metrics.get("timeouts", 0))
            if status != "ok" or message:
                failures.append((m, status, message))
                self.last_errors[m.key] = message
            if status != "ok" and m.on_error == "raise":
                raise RewardError(f"reward '{m.key}' failed ({message}) and its on_error is 'raise'")

            zeroed = 0
            for i, s in enumerate(scores):
                if m.weight == 0 or total[i] is None:
                    continue
                if s is None:
                    if m.on_error == "zero":
                        zeroed += 1
                    else:
                        total[i] = None
                else:
                    total[i] += m.weight * s
            scored = [s for s in scores if s is not None]
            prefix = f"reward/{m.key}/"
            metrics[prefix + "mean"] = sum(scored) / len(scored) if scored else float("nan")
            metrics[prefix + "skipped"] = float(n - len(scored))
            metrics[prefix + "errors"] = float(errors)
            metrics[prefix + "timeouts"] = float(timeouts)
            if m.on_error == "zero":
                metrics[prefix + "zeroed"] = float(zeroed)
            metrics[prefix + "seconds"] = res.seconds
            for k, v in res.metrics.items():
                if k not in ("errors", "timeouts") and isinstance(v, (int, float)):
                    metrics[prefix + k] = float(v)
            per_reward[m.key] = scores

        for m, status, message in failures:
            # the first failure of a reward is logged loudly, later ones in one line each
            log = logger.warning if not m.warned else logger.info
            log("reward '%s': %s (%s); samples handled per on_error=%s", m.key, status, message, m.on_error)
            m.warned = True
        done = [t for t in total if t is not None]
        metrics["reward/total/mean"] = sum(done) / len(done) if done else float("nan")
        metrics["reward/total/skipped"] = float(n - len(done))
        return RewardScores(total, per_reward, metrics)

    def close(self) -> None:
        """Stop the rewards' worker processes (math, code); idempotent."""
        for m in self.members:
            close = getattr(m.fn, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "CombinedReward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
