"""Math-Verify's own answer-level test cases, fed to the math reward.

tests/data/math_verify_cases.json holds the (gold, prediction, expected verdict) rows of
huggingface/Math-Verify's tests at the commit it names (made by tests/data/make_math_verify_cases.py,
which also lists what it left out and why). Each row is run (a) through raw Math-Verify exactly as
the upstream test runs it (the reference agreement, computed, not assumed) and (b) through
`rewards.get("math")` with the prediction as the completion and the gold as the `answer` column.
The reward may differ from Math-Verify where that is a documented choice for RL (rewards/math_extract.py),
but overall it must agree with the expected verdicts at least as often as Math-Verify, minus one
percentage point. Run with -s to see both figures."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

import rewards
from rewards.math import extract_answer

DATA = Path(__file__).with_name("data") / "math_verify_cases.json"
MAKER = Path(__file__).with_name("data") / "make_math_verify_cases.py"
TOLERANCE_PP = 1.0
OPTIONS = {"match_types", "precision", "strict", "allow_set_relation_comp"}  # compare_strings' keywords
FIX = f"rebuild it with `python {MAKER.relative_to(Path(__file__).parents[1])} <Math-Verify clone>`"


def load_cases() -> dict:
    try:
        data = json.loads(DATA.read_text())
    except (OSError, ValueError) as e:
        raise AssertionError(f"{DATA}: cannot read the Math-Verify cases ({e}); {FIX}") from e
    for key in ("sources", "excluded", "cases"):
        assert key in data, f"{DATA}: no '{key}' key; {FIX}"
    assert data["sources"][0].get("commit"), f"{DATA}: sources[0] names no Math-Verify commit; {FIX}"
    for i, case in enumerate(data["cases"]):
        where = f"{DATA} cases[{i}] ({case.get('id', '?')})"
        for key, kind in (("gold", str), ("pred", str), ("expected", bool), ("options", dict), ("helper", str)):
            assert isinstance(case.get(key), kind), f"{where}: '{key}' must be a {kind.__name__}; {FIX}"
        assert case["helper"] in ("compare_strings", "verify_parse"), f"{where}: unknown helper {case['helper']!r}"
        unknown = set(case["options"]) - OPTIONS
        assert not unknown, f"{where}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}"
    return data


def math_verify_verdict(case: dict) -> bool:
    """The row through raw Math-Verify, as its upstream test does (tests/test_all.py's compare_strings)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if case["helper"] == "verify_parse":  # tests/test_yujianll.py: verify(parse(gold), parse(pred))
        return bool(verify(parse(case["gold"]), parse(case["pred"])))
    o = case["options"]
    targets = {"latex": LatexExtractionConfig(boxed_match_priority=0), "expr": ExprExtractionConfig()}
    configs = [targets[m] for m in o.get("match_types", ["latex", "expr"])]
    return bool(verify(parse(case["gold"], configs), parse(case["pred"], configs),
                       float_rounding=o.get("precision", 6), strict=o.get("strict", True),
                       allow_set_relation_comp=o.get("allow_set_relation_comp", False)))


def reward_verdicts(cases: list[dict]) -> list[float | None]:
    """All rows through the math reward: one batch per (strict, precision) pair, one worker pool.

    The reward's own options carry the rows' strict and precision; match_types and boxed priority
    are extraction settings of Math-Verify that the reward does not have (it extracts for itself).
    """
    reward = rewards.get("math", workers=2, check_timeout_s=20.0)
    try:
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(cases):
            groups.setdefault((c["options"].get("strict", True), c["options"].get("precision", 6)), []).append(i)
        scores: list[float | None] = [None] * len(cases)
        for (strict, precision), rows in groups.items():
            reward.verify_strict, reward.float_rounding = strict, precision  # read at each call
            out = reward(["q"] * len(rows), [cases[i]["pred"] for i in rows], answer=[cases[i]["gold"] for i in rows])
            m = reward.last_metrics
            skipped = [cases[i]["id"] for i, s in zip(rows, out) if s is None]
            assert m["timeouts"] == 0 and m["errors"] == 0, (
                f"{m['timeouts']:.0f} timeouts, {m['errors']:.0f} errors in the batch strict={strict} "
                f"precision={precision}, rows {skipped}; on a busy machine raise check_timeout_s here")
            for i, s in zip(rows, out):
                scores[i] = s
        return scores
    finally:
        reward.close()


@pytest.mark.slow
def test_reward_agrees_with_math_verify_on_its_own_cases():
    data = load_cases()
    cases = data["cases"]
    assert len(cases) >= 250, f"{DATA}: only {len(cases)} cases; {FIX}"
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    raw_ok = [math_verify_verdict(c) == c["expected"] for c in cases]
    scores = reward_verdicts(cases)
    reward_ok = [s is not None and (s >= 0.5) == c["expected"] for s, c in zip(scores, cases)]

    n = len(cases)
    raw_pct, reward_pct = 100 * sum(raw_ok) / n, 100 * sum(reward_ok) / n
    src = data["sources"][0]
    figures = (f"Math-Verify's cases ({src['repo']} @ {src['commit'][:12]}, {n} rows): raw Math-Verify agrees "
               f"with {sum(raw_ok)}/{n} = {raw_pct:.1f}%, the math reward with {sum(reward_ok)}/{n} = {reward_pct:.1f}%")
    print("\n" + figures)
    misses = [f"{c['id']} (line {c['line']}): expected {c['expected']}, reward {s}, extracted "
              f"{extract_answer(c['pred']).answer!r:.80}" for c, s, ok in zip(cases, scores, reward_ok) if not ok]
    for line in misses:
        print("  reward disagrees:", line)
    assert reward_pct >= raw_pct - TOLERANCE_PP, (
        f"{figures}: more than {TOLERANCE_PP} points below Math-Verify. Disagreeing rows:\n  " + "\n  ".join(misses))


def test_the_case_maker_reads_upstream_rows_and_lists_what_it_leaves_out():
    """make_math_verify_cases.py on a small upstream-shaped test file: rows, options, exclusions."""
    spec = importlib.util.spec_from_file_location("make_math_verify_cases", MAKER)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    source = '''
import pytest
from tests.test_all import compare_strings

@pytest.mark.parametrize("gold, pred, expected", [
    ("$1$", "$\\\\boxed{1}$", 1),
    # ("$2$", "commented out", 1),
    ("$2$", "$3$", 0),
])
def test_rows(gold, pred, expected):
    assert compare_strings(gold, pred, match_types=["latex"], precision=4) == expected

@pytest.mark.parametrize("gold, pred, expected, allow_set_relation_comp", [
    ("$x \\\\in [0,1]$", "$0 \\\\le x \\\\le 1$", 1, True),
    ("$0 \\\\le x \\\\le 1$", "$x \\\\in [0,1]$", 1, False),
])
def test_rel(gold, pred, expected, allow_set_relation_comp):
    assert compare_strings(gold, pred, allow_set_relation_comp=allow_set_relation_comp) == expected

def test_internals():
    assert parse("$1$") == [1]
'''
    cases, excluded = maker.cases_of("tests/test_x.py", source, {"source": "here"})
    assert [(c["test"], c["gold"], c["pred"], c["expected"]) for c in cases] == [
        ("test_rows", "$1$", "$\\boxed{1}$", True), ("test_rows", "$2$", "$3$", False),
        ("test_rel", "$0 \\le x \\le 1$", "$x \\in [0,1]$", True)]
    assert cases[0]["options"] == {"match_types": ["latex"], "precision": 4} and cases[0]["line"] == 6
    assert [(e["test"], e.get("row")) for e in excluded] == [("test_rel", 0), ("test_internals", None)]
    assert "allow_set_relation_comp" in excluded[0]["reason"] and "no compare_strings" in excluded[1]["reason"]
