"""The code reward: HumanEval's 164 canonical solutions pass and broken bodies do not, stdin/stdout
tests, code extraction, partial credit, metrics, deadlines, and the secrets the candidate never sees."""
from __future__ import annotations

import secrets
import time

import pytest

import rewards
from data.humaneval import columns, load_humaneval
from rewards.base import call_with_deadline
from rewards.code import CodeReward, extract_code

ADD = {"prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n",
       "entry_point": "add"}


@pytest.fixture(scope="module")
def reward():
    r = CodeReward(timeout_s=5, memory_mb=512)
    yield r
    r.close()


@pytest.fixture(scope="module")
def humaneval():
    rows = load_humaneval()
    assert len(rows) == 164 and rows[0]["task_id"] == "HumanEval/0"
    return rows, columns(rows)


def add_rows(n: int) -> dict[str, list[str]]:
    return {k: [v] * n for k, v in ADD.items()}


# --- HumanEval ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(reward, humaneval):
    rows, cols = humaneval
    scores = reward(cols["prompt"], cols["canonical_solution"], **cols)
    failed = [rows[i]["task_id"] for i, s in enumerate(scores) if s != 1.0]
    assert failed == [], f"{failed} (metrics {reward.last_metrics})"
    assert reward.last_metrics["pass_rate"] == 1.0 and reward.last_metrics["errors"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("body", ["    return None\n", "    pass\n"], ids=["return-None", "empty"])
def test_humaneval_wrong_or_empty_body_never_passes(reward, humaneval, body):
    rows, cols = humaneval
    scores = reward(cols["prompt"], [body] * len(rows), **cols)
    assert [rows[i]["task_id"] for i, s in enumerate(scores) if s != 0.0] == []


def test_humaneval_whole_function_in_a_fence(reward, humaneval):
    rows, cols = humaneval
    picked = rows[:6]
    completions = [f"Here is my solution:\n```python\n{r['prompt']}{r['canonical_solution']}```\nIt works." for r in picked]
    assert reward([r["prompt"] for r in picked], completions, **columns(picked)) == [1.0] * 6


# --- extraction -----------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("    return a + b\n", "    return a + b\n"),                                     # raw body
    ("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", "def add(a, b):\n    return a + b\n"),
    ("```\nprint(1)\n```", "print(1)\n"),                                              # unlabeled fence
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```python\ndef add(a, b):\n    return a + b\n", "def add(a, b):\n    return a + b\n"),  # cut off
    ("```bash\nls\n```\n```python\nprint(2)\n```", "print(2)\n"),                     # python first
    ("```python\nimport math\n```\n```python\ndef add(a, b):\n    return 3\n```",
     "def add(a, b):\n    return 3\n"),                                                  # the one defining it
])
def test_extract_code(completion, expected):
    assert extract_code(completion, "add") == expected


# --- function tests -------------------------------------------------------------------------------

def test_function_tests_verdicts_and_metrics(reward):
    completions = ["    return a + b\n", "    return a - b\n", "    return a +\n", "```python\ndef add(a, b):\n    return b + a\n```"]
    scores = reward([""] * 4, completions, **add_rows(4))
    assert scores == [1.0, 0.0, 0.0, 1.0]
    m = reward.last_metrics
    assert m["pass_rate"] == 0.5 and m["scored"] == 4 and m["errors"] == 0 and m["timeouts"] == 0


def test_assert_list_partial_credit():
    r = CodeReward(timeout_s=5, partial_credit=True, workers=2)
    try:
        cols = {"prompt": ["def sq(x):\n"], "entry_point": ["sq"],
                "test": [["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1", "assert sq(0) == 0"]]}
        assert r([""], ["    return x * x if x > 0 else 0\n"], **cols) == [0.75]
        assert r([""], ["    return x * x\n"], **cols) == [1.0]
    finally:
        r.close()


def test_rows_without_tests_are_skipped(reward):
    scores = reward(["a", "b"], ["    return a + b\n", "print(1)"],
                    test=[ADD["test"], None], entry_point=["add", None], prompt=[ADD["prompt"], ""])
    assert scores == [1.0, None] and reward.last_metrics["no_tests"] == 1


def test_program_timeout_is_a_failure_not_a_skip():
    r = CodeReward(timeout_s=1, workers=2)
    try:
        assert r([""] * 2, ["    while True:\n        pass\n", "    return a + b\n"], **add_rows(2)) == [0.0, 1.0]
        assert r.last_metrics["program_timeouts"] == 1 and r.last_metrics["timeouts"] == 0
    finally:
        r.close()


def test_call_deadline_skips_what_it_cuts():
    r = CodeReward(timeout_s=5, workers=2)
    try:
        completions = ["    import time\n    time.sleep(60)\n"] * 4
        t0 = time.monotonic()
        out = call_with_deadline(r, [""] * 4, completions, timeout_s=2.0, **add_rows(4))
        assert out.status == "ok" and time.monotonic() - t0 < 2.0  # returned before the deadline
        assert out.scores == [None] * 4 and out.metrics["timeouts"] == 4
    finally:
        r.close()


def test_tests_and_their_answers_never_reach_the_candidate(reward):
    # The candidate is forked before the harness reads the job: no string of the tests is in its memory.
    token = f"EXPECTED_{secrets.token_hex(8)}"
    cols = {"prompt": ["def leak():\n"], "entry_point": ["leak"],
            "test": [f"def check(candidate):\n    assert candidate() == {token!r}\n"]}
    snoop = ("    import gc, sys\n"
             "    seen = []\n"
             "    def scan(o, depth=0):\n"
             "        if o is seen:\n"
             "            return\n"
             "        if isinstance(o, str) and 'EXPECTED_' in o and o != 'EXPECTED_':\n"
             "            seen.append(o[o.index('EXPECTED_'):o.index('EXPECTED_') + 25])\n"
             "        elif isinstance(o, (list, tuple, set)) and depth < 3:\n"
             "            for v in o: scan(v, depth + 1)\n"
             "        elif isinstance(o, dict) and depth < 3:\n"
             "            for k, v in o.items(): scan(k, depth + 1); scan(v, depth + 1)\n"
             "    f = sys._getframe()\n"
             "    while f:\n"
             "        scan(f.f_locals); f = f.f_back\n"
             "    for o in gc.get_objects():\n"
             "        scan(o)\n"
             "    return seen[0] if seen else ''\n")
    assert reward([""], [snoop], **cols) == [0.0]
    cols["prompt"] = [f"# {token}\ndef leak():\n"]  # control: where the candidate can see it, the snoop finds it
    assert reward([""], [snoop], **cols) == [1.0]


# --- stdin/stdout tests ---------------------------------------------------------------------------

SUM = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}, {"input": "0 0\n", "output": "0\n"}]


def test_stdio_verdicts(reward):
    programs = [
        "a, b = map(int, input().split())\nprint(a + b)",
        "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b, '  ')\n```",  # trailing spaces: fine
        "a, b = map(int, input().split())\nprint(a - b)",
        "import sys\nsys.exit(0)\nprint(3)",                             # exits before printing
        "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)",  # right output, failing status
        "print(int(input().split()[0]) + int(input()))",                  # crashes (EOFError)
    ]
    assert reward([""] * 6, programs, tests=[SUM] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_stdio_partial_credit_and_timeouts():
    r = CodeReward(timeout_s=1, partial_credit=True, workers=2)
    try:
        program = ("a, b = map(int, input().split())\n"
                   "while a == 10:\n    pass\n"
                   "print(a + b if a else 1)")
        assert r([""], [program], tests=[SUM]) == [pytest.approx(1 / 3)]
        assert r.last_metrics["program_timeouts"] == 1
        assert r([""], ["print(int(input().split()[0]) + 2)"], tests=['[{"input": "1 2", "output": "3"}]']) == [1.0]
    finally:
        r.close()


def test_stdio_expected_output_never_enters_the_sandbox(reward):
    token = f"ANSWER_{secrets.token_hex(8)}"
    snoop = ("import gc, os, sys\n"
             "seen = [s for o in gc.get_objects() for s in (o if isinstance(o, (list, tuple)) else [o])\n"
             "        if isinstance(s, (str, bytes)) and b'ANSWER_' in (s if isinstance(s, bytes) else s.encode())]\n"
             "print(seen[0][-len('ANSWER_') - 16:] if seen else 'nothing')\n")
    assert reward([""], [snoop], tests=[[{"input": "", "output": token}]]) == [0.0]
    snoop_stdin = "import sys\nprint(sys.stdin.read())"  # control: what the program is given, it can echo
    assert reward([""], [snoop_stdin], tests=[[{"input": token, "output": token}]]) == [1.0]


def test_stdio_huge_output_is_capped():
    r = CodeReward(timeout_s=2, max_output_bytes=10_000, workers=1)
    try:
        assert r([""], ["while True:\n    print('x' * 100)"], tests=[SUM[:1]]) == [0.0]
    finally:
        r.close()


def test_registered_as_code():
    r = rewards.get("code", timeout_s=2, workers=1)
    try:
        assert isinstance(r, CodeReward)
        assert r([""], ["    return a + b\n"], **add_rows(1)) == [1.0]
    finally:
        r.close()
