"""The escape battery, part 3: attacks on the verdict, through `CodeReward` on small tasks whose
correct solution passes. A failing candidate never turns a case into a pass: not by exiting early,
not with objects that equal anything, not by forging the report, not by patching the interpreter,
and not with its exceptions, whatever the test code is written like (HumanEval `check`, MBPP assert
lists, table-driven loops, generators): only values and per-case outcomes cross to the harness.
"""
from __future__ import annotations

import pytest
from battery import CAP, WALL_S, nothing_left_running, score  # noqa: F401

from rewards.code import CodeReward


@pytest.fixture(scope="module")
def reward():
    r = CodeReward(timeout_s=WALL_S, memory_mb=256, max_output_bytes=CAP, workers=2)
    yield r
    r.close()


def test_correct_solution_passes(reward):
    assert score(reward, "    return a + b\n") == 1.0


@pytest.mark.parametrize("completion", [
    "import sys\nsys.exit(0)\n",                       # before the function is even defined
    "import os\nos._exit(0)\n",
    "    import sys\n    sys.exit(0)\n",               # as the body: exits during the tests
    "    import os\n    os._exit(0)\n",
    "    raise SystemExit(0)\n",
])
def test_exiting_early_fails(reward, completion):
    assert score(reward, completion) == 0.0


@pytest.mark.parametrize("completion", [
    "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
    "    class Yes(int):\n        def __eq__(self, other):\n            return True\n    return Yes(0)\n",
    "    class Yes(list):\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
    "    import unittest.mock\n    return unittest.mock.ANY\n",
])
def test_always_equal_objects_fail(reward, completion):
    assert score(reward, completion) == 0.0


def test_forged_reports_fail(reward):
    body = ("    import os, sys\n"
            "    for fd in range(1, 30):\n"
            "        for line in ('x start\\n', 'x case 0 1 0 -\\n', 'x case 1 1 0 -\\n', 'x done\\n'):\n"
            "            try:\n                os.write(fd, line.encode())\n            except OSError:\n                pass\n"
            "    print('x case 0 1 0 -')\n"
            "    return None\n")
    assert score(reward, body) == 0.0


def test_patching_the_interpreter_does_not_help(reward):
    # In-process tricks that beat an exec()-based checker: skip asserts by tracing, rewrite ==.
    body = ("    import sys, builtins\n"
            "    sys.settrace(lambda *a: None)\n"
            "    builtins.AssertionError = type('Nope', (Exception,), {})\n"
            "    return 0\n")
    assert score(reward, body) == 0.0


# --- the candidate's exceptions ---------------------------------------------------------------------

INC_PROMPT = 'def inc(x):\n    """Return x + 1."""\n'
# One task, `inc`, tested in each common style. Every style passes the right solution and fails a
# wrong value; none may pass a candidate that answers the first input and then misbehaves.
STYLES = {
    "humaneval-check": "def check(candidate):\n"
                       "    for got, want in zip(map(candidate, [1, 2, 3]), [2, 3, 4]):\n"
                       "        assert got == want\n",
    "mbpp-asserts": ["assert inc(1) == 2", "assert all(map(lambda x: inc(x) == x + 1, [2, 3]))"],
    "table-driven": "TABLE = [(1, 2), (2, 3), (3, 4)]\n\n"
                    "def check(candidate):\n"
                    "    for x, want in TABLE:\n"
                    "        try:\n"
                    "            got = candidate(x)\n"
                    "        except Exception:  # an input it may reject\n"
                    "            continue\n"
                    "        assert got == want, (x, got)\n",
    "generator": "def cases():\n"
                 "    for x in [1, 2, 3]:\n"
                 "        yield x, x + 1\n\n"
                 "def check(candidate):\n"
                 "    def checker():\n"
                 "        try:\n"
                 "            while True:\n"
                 "                x, want = yield\n"
                 "                assert candidate(x) == want\n"
                 "        except GeneratorExit:  # closed: every case was sent\n"
                 "            return\n"
                 "    c = checker()\n"
                 "    next(c)\n"
                 "    for case in cases():\n"
                 "        c.send(case)\n"
                 "    c.close()\n",
    "iterator": "class Answers:\n"
                "    def __init__(self, candidate, inputs):\n"
                "        self.candidate, self.inputs = candidate, iter(inputs)\n"
                "    def __iter__(self):\n"
                "        return self\n"
                "    def __next__(self):\n"
                "        return self.candidate(next(self.inputs))\n\n"
                "def check(candidate):\n"
                "    for got, want in zip(Answers(candidate, [1, 2, 3]), [2, 3, 4]):\n"
                "        assert got == want\n",
    "bare-except": "def check(candidate):\n"
                   "    for x in [1, 2, 3]:\n"
                   "        try:\n"
                   "            ok = candidate(x) == x + 1\n"
                   "        except AssertionError:\n"
                   "            raise\n"
                   "        except:  # noqa: E722\n"
                   "            continue\n"
                   "        assert ok\n",
}
FIRST_ONLY = "    if x == 1:\n        return 2\n"
MISBEHAVIOURS = {
    "StopIteration": "    raise StopIteration\n",
    "GeneratorExit": "    raise GeneratorExit\n",
    "KeyboardInterrupt": "    raise KeyboardInterrupt\n",
    "SystemExit": "    raise SystemExit(0)\n",
    "BaseException-subclass": "    class Escape(BaseException):\n        pass\n    raise Escape()\n",
    "ValueError": "    raise ValueError('no')\n",
    "exit": "    import os\n    os._exit(0)\n",
    "SIGINT-to-the-harness": "    import os, signal, time\n    os.kill(os.getppid(), signal.SIGINT)\n"
                             "    time.sleep(0.05)\n    raise ValueError('no')\n",
    "wrong-value": "    return 0\n",
}


def task(style: str) -> dict:
    return {"prompt": INC_PROMPT, "test": STYLES[style], "entry_point": "inc"}


@pytest.mark.parametrize("style", STYLES)
def test_each_test_style_passes_the_right_solution(reward, style):
    assert score(reward, "    return x + 1\n", task(style)) == 1.0


@pytest.mark.parametrize("misbehaviour", MISBEHAVIOURS.values(), ids=MISBEHAVIOURS.keys())
@pytest.mark.parametrize("style", STYLES)
def test_a_failing_candidate_never_turns_a_test_into_a_pass(reward, style, misbehaviour):
    assert score(reward, FIRST_ONLY + misbehaviour, task(style)) == 0.0
    assert reward.last_metrics["errors"] == 0  # a failed case, not a skipped sample


def test_a_hang_fails_the_case_even_where_the_test_swallows_it(reward):
    assert score(reward, FIRST_ONLY + "    while True:\n        pass\n", task("table-driven")) == 0.0
    assert reward.last_metrics["program_timeouts"] == 1


def test_a_raise_fails_only_its_own_case_with_partial_credit():
    r = CodeReward(timeout_s=WALL_S, memory_mb=256, workers=1, partial_credit=True)
    try:
        cases = ["assert inc(1) == 2", "assert inc(2) == 3", "assert inc(3) == 4"]
        body = "    if x == 2:\n        raise StopIteration\n    return x + 1\n"
        assert score(r, body, {"prompt": INC_PROMPT, "test": cases, "entry_point": "inc"}) == pytest.approx(2 / 3)
    finally:
        r.close()


def test_a_tamper_attempt_fails_and_is_counted(reward):
    body = "    import os\n    os.setpriority(os.PRIO_PROCESS, 1, 19)\n    return x + 1\n"
    assert score(reward, body, task("humaneval-check")) == 0.0
    assert reward.last_metrics["tamper_attempts"] == 1
    assert score(reward, "    return x + 1\n", task("humaneval-check")) == 1.0
    assert reward.last_metrics["tamper_attempts"] == 0
