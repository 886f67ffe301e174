"""Math reward: extract the final answer, then check it against the reference with Math-Verify.

Extraction (`rewards/math_extract.py`, in the trainer's process, no sympy): the boxes, markers and
fallbacks of Math-Verify's parser, with the deliberate differences listed there.

Equivalence (`check_equivalent`) runs Math-Verify's `parse` and `verify` in `WorkerPool`
processes: fractions, decimals, percent, thousands separators, sqrt forms, intervals with their
openness, sets, matrices, `x =` prefixes and LaTeX units. Math-Verify's own timeout uses
SIGALRM, which raises off the main thread and cannot interrupt a big integer power inside C
(`9**9**9**9` never returns); so each check has a hard deadline after which its worker is killed
and replaced, and workers have an address-space limit. Identical strings skip the worker.

Score per sample: 1.0 if the answer is equivalent to the reference, else 0.0 (no answer found
is a 0, the model's fault); plus `format_bonus` if the completion uses the required answer
format, minus `format_penalty` if it does not. None (sample skipped, counted) when the check
timed out or failed, or when the reference answer is missing.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from typing import Literal, Optional, Sequence

from .base import time_left
from .math_extract import FORMATS, SOURCES, Extracted, comma_readings, extract_answer
from .workers import WorkerPool

__all__ = ["MathReward", "answer_format", "check_equivalent", "extract_answer", "Extracted", "FORMATS", "SOURCES"]


def answer_format(prompts: list[str], completions: list[str], pattern: str = r"Answer:\s*\S+\s*$",
                  **columns: list) -> list[float]:
    """1.0 if the completion ends with the answer format (default `Answer: <x>` on the last line), else 0.0.

        >>> answer_format(["What is 2 + 2?"] * 2, ["2 + 2 = 4. Answer: 4", "It is 4."])
        [1.0, 0.0]
    """
    regex = re.compile(pattern)
    return [1.0 if regex.search(c.strip()) else 0.0 for c in completions]


# ----------------------------------------------------------------------------- equivalence (in workers)

_POWER_CHAIN_RE = re.compile(r"[\w.]+(?:\s*\^\s*[\w.]+)+")


def _nest_power(chain: re.Match) -> str:
    """'9^9^9' -> '9^{9^{9}}': exponents are right-associative, and LaTeX reads 2^10 as 2^1 0."""
    parts = [p.strip() for p in chain.group(0).split("^")]
    nested = parts[-1]
    for base in reversed(parts[:-1]):
        nested = f"{base}^{{{nested}}}"
    return nested


def _as_latex(answer: str) -> str:
    answer = _POWER_CHAIN_RE.sub(_nest_power, answer.strip().replace("**", "^"))
    if ("$" in answer and answer.count("$") % 2 == 0) or "\\boxed" in answer:
        return answer
    return "$" + answer.replace("\n", " ") + "$"  # inline math is one line for Math-Verify


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> list:
    from math_verify import parse

    return parse(_as_latex(answer), parsing_timeout=None)  # None: no SIGALRM; the pool's deadline applies


def check_equivalent(gold: str, pred: str, strict: bool = True, float_rounding: int = 6) -> bool:
    """Whether `pred` is mathematically equal to `gold` (Math-Verify). Runs inside a worker.

    strict: Math-Verify's strict mode (variable names matter; a set is not a tuple).
    A `2,74` on either side is read both ways (`comma_readings`): any reading of one equal to any
    reading of the other counts. Raises ValueError when the reference itself does not parse.
    """
    from math_verify import verify

    gold_parsed = [x for reading in comma_readings(gold) for x in _parse(reading)]
    if not gold_parsed:
        raise ValueError(f"reference answer {gold[:80]!r} does not parse")
    pred_parsed = [x for reading in comma_readings(pred) for x in _parse(reading)]
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, float_rounding=float_rounding, strict=strict, timeout_seconds=None))


def warmup_worker() -> None:
    """Run by each worker before it takes tasks: imports sympy and the LaTeX parser (about 1 s)."""
    # Math-Verify warns on every call that timeouts are disabled (we do them with processes)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    check_equivalent(r"\frac{1}{2}", "0.5")
    _parse.cache_clear()


# ----------------------------------------------------------------------------- the reward

class MathReward:
    """`rewards.get("math", **options)`: exact-answer reward with a killable Math-Verify check.

    Columns: `answer` (the reference answer, any form Math-Verify parses; name set by `answer_column`).

        >>> r = MathReward(workers=1)
        >>> r(["What is 27 + 45?"] * 3, ["27 + 45 = 72. Answer: 72", "Answer: 62", "no idea"],
        ...   answer=["72"] * 3)
        [1.0, 0.0, 0.0]
        >>> r.last_metrics["accuracy"]
        0.3333333333333333
        >>> r.close()

    Sub-metrics (`last_metrics`): accuracy (over checked samples), formatted (share in the required
    format), no_answer (share with nothing extracted), timeouts / errors (samples skipped),
    missing_reference, check_seconds (wall time of the batch's checks).
    """

    def __init__(
        self,
        answer_column: str = "answer",
        answer_format: Literal["any", "boxed", "hash", "answer"] = "any",
        strict: bool = False,
        format_bonus: float = 0.0,
        format_penalty: float = 0.0,
        verify_strict: bool = True,
        float_rounding: int = 6,
        check_timeout_s: float = 2.0,
        workers: int | None = None,
        memory_mb: int = 1024,
        max_answer_chars: int = 1000,
    ):
        """
        answer_column: dataset column holding the reference answer.
        answer_format: the required format: any (boxed, ####, or Answer:/The answer is), or one of them.
        strict: score only answers given in the required format; otherwise fall back to the last number.
        format_bonus / format_penalty: added when the format is used / subtracted when it is not.
        verify_strict: Math-Verify strict mode (variable names matter, sets are not tuples).
        float_rounding: decimals Math-Verify rounds to before comparing numbers.
        check_timeout_s: hard deadline of one check; the worker is killed and replaced after it.
        workers: worker processes (default: min(4, CPU cores per local rank)).
        memory_mb: address-space limit of each worker.
        max_answer_chars: longer extracted answers are scored 0 without a check.
        """
        if answer_format not in FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(FORMATS)}, got {answer_format!r}")
        if check_timeout_s <= 0:
            raise ValueError(f"check_timeout_s must be positive, got {check_timeout_s}")
        self.answer_column, self.answer_format, self.strict = answer_column, answer_format, strict
        self.format_bonus, self.format_penalty = float(format_bonus), float(format_penalty)
        self.verify_strict, self.float_rounding = verify_strict, float_rounding
        self.check_timeout_s, self.max_answer_chars = check_timeout_s, max_answer_chars
        self.pool = WorkerPool("rewards.math:check_equivalent", workers=workers or default_workers(), memory_mb=memory_mb)
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence) -> list[float | None]:
        if self.answer_column not in columns:
            raise KeyError(f"the math reward needs a '{self.answer_column}' column with reference answers; "
                           f"got columns {sorted(columns)}")
        golds = columns[self.answer_column]
        allowed = FORMATS[self.answer_format]
        scores: list[float | None] = [None] * len(completions)
        correct: list[Optional[bool]] = [None] * len(completions)
        formatted = [False] * len(completions)
        tasks, task_rows = [], []
        no_answer = missing = 0
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            ext = extract_answer(completion, strict=False)
            formatted[i] = ext.source in allowed
            if gold is None or not str(gold).strip():
                missing += 1
                continue
            answer = ext.answer if (formatted[i] or not self.strict) else None
            if answer is None:
                no_answer += 1
                correct[i] = False
            elif answer.strip() == str(gold).strip():
                correct[i] = True  # identical text needs no sympy
            elif len(answer) > self.max_answer_chars:
                correct[i] = False
            else:
                tasks.append({"gold": str(gold), "pred": answer, "strict": self.verify_strict,
                              "float_rounding": self.float_rounding})
                task_rows.append(i)
        t0 = time.monotonic()
        outcomes = self.pool.run(tasks, timeout_s=self.check_timeout_s, deadline_s=_budget()) if tasks else []
        check_seconds = time.monotonic() - t0
        timeouts = errors = 0
        for i, out in zip(task_rows, outcomes):
            if out.status == "ok":
                correct[i] = bool(out.value)
            elif out.status == "timeout":
                timeouts += 1
            else:
                errors += 1
        for i, ok in enumerate(correct):
            if ok is not None:
                fmt = self.format_bonus if formatted[i] else -self.format_penalty
                scores[i] = (1.0 if ok else 0.0) + fmt
        checked = [ok for ok in correct if ok is not None]
        n = max(len(completions), 1)
        self.last_metrics = {
            "accuracy": sum(checked) / len(checked) if checked else float("nan"),
            "formatted": sum(formatted) / n,
            "no_answer": no_answer / n,
            "timeouts": float(timeouts),
            "errors": float(errors),
            "missing_reference": float(missing),
            "check_seconds": check_seconds,
        }
        return scores

    def close(self) -> None:
        """Kill the worker processes (also done at garbage collection and exit)."""
        self.pool.close()


def default_workers() -> int:
    """min(4, this rank's share of the CPU cores): torchrun ranks on one machine split the cores."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(4, (os.cpu_count() or 1) // max(local_ranks, 1)))


def _budget() -> float | None:
    """What is left of the enclosing reward deadline, minus a margin to return in time."""
    left = time_left()
    return None if left is None else max(0.0, left - 0.2)
