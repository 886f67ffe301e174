"""Code reward: model-written Python run against tests in the sandbox; the verdict is ours.

    reward = CodeReward(timeout_s=5)
    reward(prompts, completions, prompt=[...], test=[...], entry_point=[...])     # HumanEval-style
    reward(prompts, completions, tests=[[{"input": "1 2\\n", "output": "3\\n"}], ...])  # stdin/stdout
    -> [1.0, 0.0, None, ...]      # None: no tests in the row, or the sandbox itself failed
    reward.last_metrics           # {"pass_rate": 0.5, "timeouts": 1.0, "tamper_attempts": 0.0, ...}

Rows with `test` + `entry_point` (+ `prompt`, the code the completion continues) are function tests:
the program is prompt + completion, the check is `check(entry_point)` from `test` (or, when `test`
is a list of strings, each string is one case, e.g. MBPP's asserts). Rows with `tests` (a list of
{"input", "output"}, or its JSON) are stdin/stdout tests, one case per pair. The code is taken from
the completion's ```python fence (the one defining the entry point if several), or the raw text.

Threat model. The completion is adversarial. It may try to escape (files, network, processes, the
trainer), exhaust the machine, or fake a pass. Escape and exhaustion are rewards/sandbox.py's job.
Faking a pass is this module's, and the verdict never rests on anything the candidate controls:
- An exit status proves nothing: only per-case reports count, so sys.exit(0) or os._exit(0) before
  the tests is a failure. A stdio case passes only with the expected output AND exit status 0.
- Reports are lines prefixed with a random per-call nonce, on the sandbox's stdout, written by the
  harness (rewards/code_harness.py) in a process of its own. The candidate runs in another process
  whose stdout and stderr go to the sandbox's stderr, that holds no other descriptor, and that cannot
  reach the harness's memory (no /proc, no ptrace). Printing a fake report reaches only stderr.
- Objects made by untrusted code are never compared with their own `==`: return values cross the
  process boundary as a text encoding of exact builtin types and are rebuilt by the harness, so an
  object whose `__eq__` is always true fails to cross. Stdio outputs are compared here, as text; the
  expected outputs never enter the sandbox.
- The candidate process is forked before the harness reads the job, so the tests and the nonce were
  never in its memory (stdio children can see the other inputs, never the outputs).
- Only values and per-case outcomes cross: a call of the candidate that raises (any exception,
  StopIteration and BaseException subclasses included), exits, hangs or answers garbage fails its
  case, and is never re-raised by type into the test code, so no loop, generator or `except` in a
  test can turn it into a pass. Tests therefore cannot expect an exception from the candidate.
- A job that reaches for its slot's trusted state is killed or its slot replaced (sandbox.py);
  the samples whose jobs tried are counted in `tamper_attempts`.
Not defended: a solution that special-cases public tests (HumanEval's are public); the dataset's
test code is trusted (it runs in the sandbox all the same).
"""
from __future__ import annotations

import json
import marshal
import re
import secrets
import time
from signal import SIGSYS
from pathlib import Path

from rewards.base import time_left
from rewards.sandbox import Job, Sandbox, SandboxResult

HARNESS = Path(__file__).with_name("code_harness.py")
STARTUP_GRACE_S = 2.0  # on top of the per-case timeouts: bwrap, interpreter and harness start-up
DEADLINE_MARGIN_S = 0.5  # finish this long before the recipe's deadline for the whole call
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
PYTHON_TAGS = {"python", "py", "python3", "py3", ""}
IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\w+)|import[ \t]+(\w+))", re.M)
# Imported by the harness before it forks the candidate, so both processes share one import (typing
# alone is 8 ms; HumanEval's prompts and tests import it in both). Side-effect-free stdlib only.
PRELOAD = {"typing", "re", "math", "cmath", "collections", "itertools", "functools", "heapq", "bisect", "string",
           "hashlib", "fractions", "decimal", "statistics", "random", "copy", "operator", "json", "datetime"}


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The Python in a completion: a fenced block (the one defining `entry_point` when several,
    else the first python one), an unterminated fence up to the end, or the raw text.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    """
    blocks = [(lang.lower(), body) for lang, body in FENCE.findall(completion)]
    if not blocks:
        return completion
    python = [body for lang, body in blocks if lang in PYTHON_TAGS] or [body for _, body in blocks]
    if entry_point:
        for body in python:
            if _defines(body, entry_point):
                return body
    return python[0]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _compiles(code: str) -> bool:
    try:
        compile(code, "<prompt>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def _preload(*sources: str) -> tuple[str, ...]:
    return tuple(sorted({a or b for src in sources for a, b in IMPORT.findall(src)} & PRELOAD))


def _lines(text: str) -> list[str]:
    """Judge-style normalisation: trailing spaces on each line and trailing blank lines ignored."""
    return [line.rstrip() for line in text.rstrip().splitlines()]


class CodeReward:
    """Fraction of tests passed (partial_credit=True) or 1.0 only when all pass, per completion."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1 << 20,
                 workers: int | None = None, unsafe: bool = False, partial_credit: bool = False,
                 python: str | None = None, bwrap: str = "bwrap"):
        self.timeout_s, self.max_output_bytes, self.partial_credit = timeout_s, max_output_bytes, partial_credit
        self.sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                               workers=workers, unsafe=unsafe, python=python, bwrap=bwrap)
        source = HARNESS.read_text()
        self._harness = {mode: self.sandbox.compile(f"{source}\nmain({mode!r})\n", str(HARNESS))
                         for mode in ("function", "stdio")}
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        plans = [self._plan(c, row) for c, row in zip(completions, rows)]
        runnable = [p for p in plans if p is not None]
        left = time_left()  # inside a recipe's reward deadline: return before it, never get abandoned
        deadline = None if left is None else time.monotonic() + max(left - DEADLINE_MARGIN_S, 0.0)
        results = iter(self.sandbox.map([p["job"] for p in runnable], deadline=deadline))
        verdicts = [self._verdict(p, next(results)) if p is not None else None for p in plans]
        self.last_metrics = self._metrics(verdicts, len(plans))
        return [v["score"] if v else None for v in verdicts]

    # --- building a job ---------------------------------------------------------------------------------

    def _plan(self, completion: str, row: dict) -> dict | None:
        nonce = secrets.token_hex(16)
        tests = row.get("tests")
        if tests is not None:
            tests = json.loads(tests) if isinstance(tests, str) else tests
            job = {"nonce": nonce, "program": extract_code(completion), "inputs": [t["input"] for t in tests],
                   "case_timeout": self.timeout_s, "max_output": self.max_output_bytes,
                   "stop_on_fail": not self.partial_credit}
            mode, expected = "stdio", [t["output"] for t in tests]
        elif row.get("test") is not None and row.get("entry_point"):
            entry, prompt, test = row["entry_point"], row.get("prompt") or "", row["test"]
            code = extract_code(completion, entry)
            if _defines(code, entry):  # a whole function: keep the prompt's imports and helpers if it compiles
                program = (prompt + "\n" if _compiles(prompt) else "") + code
            else:                      # the body that continues the prompt
                program = prompt + code
            cases = list(test) if isinstance(test, (list, tuple)) else [f"check({entry})"]
            setup = prompt if _compiles(prompt) else ""
            setup += "\n\n" + (test if isinstance(test, str) else "")
            job = {"nonce": nonce, "program": program, "entry_point": entry, "setup": setup, "cases": cases,
                   "case_timeout": self.timeout_s, "stop_on_fail": not self.partial_credit}
            mode, expected = "function", None
        else:
            return None
        n = len(job["cases"] if mode == "function" else job["inputs"])
        if n == 0:
            return None
        wall = self.timeout_s * (n + (mode == "function")) + STARTUP_GRACE_S
        report_cap = n * (2 * self.max_output_bytes + 256) + 4096  # stdio outputs travel in hex
        preload = _preload(job["program"], job.get("setup", ""))
        sandbox_job = Job(self._harness[mode], marshal.dumps(job), wall_s=wall, max_output=report_cap, preload=preload)
        return {"mode": mode, "nonce": nonce, "n": n, "expected": expected, "job": sandbox_job}

    # --- deciding --------------------------------------------------------------------------------------

    def _verdict(self, plan: dict, res: SandboxResult) -> dict | None:
        """Per-case pass/fail from the nonce-tagged report lines; None if the harness never started."""
        started, passed, timeouts, setup_error = False, set(), 0, False
        tamper = res.tamper is not None  # the job reached for its slot's trusted state (see sandbox.py)
        for line in res.stdout.decode(errors="replace").splitlines():
            fields = line.split(" ")
            if fields[0] != plan["nonce"] or len(fields) < 2:
                continue
            kind = fields[1]
            started |= kind == "start"
            setup_error |= kind == "setup_error"
            if kind != "case":
                continue
            try:
                i = int(fields[2])
                if plan["mode"] == "function":
                    ok, timed_out = fields[3] == "1", fields[4] == "1"
                else:
                    code, timed_out, capped = int(fields[3]), fields[4] == "1", fields[5] == "1"
                    tamper |= code == -SIGSYS  # the harness reaped a program the filter killed
                    out = bytes.fromhex("" if fields[6] == "-" else fields[6]).decode(errors="replace")
                    ok = (code == 0 and not timed_out and not capped
                          and _lines(out) == _lines(plan["expected"][i]))
            except (IndexError, ValueError):
                continue  # our own harness wrote it, but a killed write can be truncated
            timeouts += timed_out
            if ok and 0 <= i < plan["n"]:
                passed.add(i)
        if res.killed_reason == "deadline":
            return {"score": None, "deadline": True, "tamper": tamper}  # not run, or cut short, by the deadline
        if not started or setup_error:
            return {"score": None, "sandbox_error": not started, "setup_error": setup_error, "tamper": tamper}
        frac = len(passed) / plan["n"]
        score = frac if self.partial_credit else float(frac == 1.0)
        return {"score": score, "all": frac == 1.0, "program_timeout": bool(timeouts) or res.timed_out,
                "capped": res.killed_reason == "output_cap", "wall_s": res.wall_s, "tamper": tamper}

    def _metrics(self, verdicts: list[dict | None], n: int) -> dict[str, float]:
        """`errors` and `timeouts` count samples scored None (the registry's fixed meaning); a program
        that ran out of time is a failed test, counted under `program_timeouts`."""
        scored = [v for v in verdicts if v and v["score"] is not None]
        mean = lambda key: sum(v[key] for v in scored) / len(scored) if scored else 0.0  # noqa: E731
        return {
            "pass_rate": mean("score"),
            "all_passed": mean("all"),
            "scored": float(len(scored)),
            "no_tests": float(sum(v is None for v in verdicts)),
            "program_timeouts": float(sum(v["program_timeout"] for v in scored)),
            "output_capped": float(sum(v["capped"] for v in scored)),
            "errors": float(sum(bool(v and (v.get("sandbox_error") or v.get("setup_error"))) for v in verdicts)),
            "sandbox_errors": float(sum(bool(v and v.get("sandbox_error")) for v in verdicts)),
            "setup_errors": float(sum(bool(v and v.get("setup_error")) for v in verdicts)),
            "timeouts": float(sum(bool(v and v.get("deadline")) for v in verdicts)),
            "tamper_attempts": float(sum(bool(v and v["tamper"]) for v in verdicts)),
            "mean_wall_s": mean("wall_s"),
        }

    def close(self) -> None:
        self.sandbox.close()
