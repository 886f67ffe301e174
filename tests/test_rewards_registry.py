"""Reward registry sources, unknown names, deadlines, fail-closed errors and the weighted combination."""

import math
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import rewards
from posttrain.config import RewardSpec
from posttrain.errors import UserError
from posttrain.recipe import build_config, read_recipe
from rewards import registry
from rewards.base import RewardError

ROOT = Path(__file__).resolve().parents[1]
P, C = ["p1", "p2", "p3"], ["a", "bb", "ccc"]


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Each test registers into a copy; the built-ins are restored afterwards."""
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))


def const(value):
    def reward(prompts, completions, **columns):
        return [value] * len(completions)
    return reward


# ----------------------------------------------------------------------------- sources

def test_builtin_names_are_lazy_strings_and_resolve():
    assert {"math", "format", "code", "safety"} <= set(rewards.available())
    assert registry.REGISTRY["code"] == "rewards.code:CodeReward"  # imported only when used
    from rewards.math import MathReward
    from rewards.safety import SafetyReward
    assert rewards.resolve("math") is MathReward and rewards.resolve("safety") is SafetyReward
    assert rewards.get("format")(["q", "q"], ["x. Answer: 4", "4"]) == [1.0, 0.0]


def test_unknown_name_lists_valid_names_and_a_close_match():
    with pytest.raises(UserError) as e:
        rewards.get("maths")
    msg = str(e.value)
    assert "unknown reward 'maths'" in msg and "did you mean 'math'?" in msg
    for name in ("code", "format", "math", "safety", "reward_model"):
        assert name in msg
    assert "file.py:attr" in msg


def test_decorator_registers_functions_and_classes():
    @rewards.register("shout")
    def shout(prompts, completions, penalty=1.0, **columns):
        return [-penalty if c.isupper() else 0.0 for c in completions]

    @rewards.register("counter")
    class Counter:
        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, prompts, completions, **columns):
            return [self.scale * len(c) for c in completions]

    assert rewards.get("shout", penalty=2.0)(P, ["A", "b", "C"]) == [-2.0, 0.0, -2.0]
    counter = rewards.get("counter", scale=0.5)
    assert isinstance(counter, Counter) and counter(P, C) == [0.5, 1.0, 1.5]
    assert "shout" in rewards.available()
    with pytest.raises(ValueError):
        rewards.register("bad:name")


def test_options_a_reward_does_not_take_are_errors():
    @rewards.register("plain")
    def plain(prompts, completions, scale=1.0, **columns):
        return [scale] * len(completions)

    with pytest.raises(UserError, match=r"reward 'plain' has no option\(s\) 'scael'; its options: scale"):
        rewards.get("plain", scael=2.0)
    with pytest.raises(UserError, match="no option"):
        rewards.get("math", check_timeout=1)


def test_entry_point_of_an_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "acme_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def polite(prompts, completions, **columns):\n"
                                     "    return [float('please' in c) for c in completions]\n")
    dist = tmp_path / "acme_rewards-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rewards\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[posttrain.rewards]\npolite = acme_rewards:polite\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "polite" in rewards.available()
    assert rewards.get("polite")(["q", "q"], ["please do", "do it"]) == [1.0, 0.0]
    with pytest.raises(UserError) as e:
        rewards.get("polit")
    assert "did you mean 'polite'?" in str(e.value)


def test_module_attr(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text("def exclaim(prompts, completions, **columns):\n"
                                              "    return [float(c.endswith('!')) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.get("team_rewards:exclaim")(["q", "q"], ["yes!", "no"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="has no attribute 'exclam'; did you mean 'exclaim'"):
        rewards.get("team_rewards:exclam")
    with pytest.raises(UserError, match="no module named 'no_such_pkg.rewards'"):
        rewards.get("no_such_pkg.rewards:thing")


def test_file_path_attr(tmp_path):
    path = tmp_path / "sub dir" / "mine.py"
    path.parent.mkdir()
    path.write_text("CALLS = []\n\nclass Const:\n    def __init__(self, value=1.0):\n        self.value = value\n"
                    "    def __call__(self, prompts, completions, **columns):\n"
                    "        CALLS.append(1)\n        return [self.value] * len(completions)\n")
    reward = rewards.get(f"{path}:Const", value=0.25)
    assert reward(P, C) == [0.25] * 3
    assert rewards.resolve(f"{path}:Const") is type(reward)  # loaded once, same module after
    with pytest.raises(UserError, match="does not exist"):
        rewards.get(f"{tmp_path}/missing.py:Const")
    with pytest.raises(UserError, match="must look like"):
        rewards.get(f"{path}:")


def test_custom_reward_file_plugged_in_from_a_recipe(tmp_path, monkeypatch):
    """The README's worked example: examples/my_reward.py, named in a recipe, scored with math."""
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(textwrap.dedent("""
        rewards:
          - {name: format, weight: 1.0}
          - {name: examples/my_reward.py:brevity, weight: 0.5, options: {max_chars: 10}}
          - {name: examples/my_reward.py:MentionsUnits, weight: 0.25, timeout_s: 2, options: {units: [cm]}}
    """))
    raw, path = read_recipe(str(recipe))
    cfg = build_config(raw, recipe=path)
    assert [r.name for r in cfg.rewards][1] == "examples/my_reward.py:brevity"
    combined = rewards.from_config(cfg.rewards)
    out = combined.score(["How long?", "How long?"], ["It is 12 cm. Answer: 12", "Answer: 3"],
                         needs_units=[True, False])
    # row 0: format 1 + brevity 0.5 * 0 (23 chars >= 2 * 10) + units 0.25 * 1; row 1: MentionsUnits skips it
    assert out.total == [1.25, None]
    assert out.per_reward["brevity"] == [0.0, 1.0]
    assert out.metrics["reward/MentionsUnits/hit_rate"] == 0.5
    assert out.metrics["reward/MentionsUnits/skipped"] == 1


# ----------------------------------------------------------------------------- deadlines and failures

def test_hanging_reward_times_out_within_the_deadline_and_is_counted():
    release = threading.Event()

    def hang(prompts, completions, **columns):
        release.wait(60)
        return [1.0] * len(completions)

    try:
        combined = rewards.CombinedReward([("hang", hang, 1.0, 0.5, "skip"), ("ok", const(2.0), 1.0, 5.0, "skip")])
        t0 = time.monotonic()
        out = combined.score(P, C)
        took = time.monotonic() - t0
        assert took < 0.5 + 0.3, took
        assert out.total == [None, None, None]
        m = out.metrics
        assert m["reward/hang/timeouts"] == 3 and m["reward/hang/errors"] == 0 and math.isnan(m["reward/hang/mean"])
        assert m["reward/ok/mean"] == 2.0 and m["reward/ok/timeouts"] == 0
        assert m["reward/total/skipped"] == 3
        # while the abandoned call still runs, the next one is refused at once (no thread pile-up)
        t0 = time.monotonic()
        out = combined.score(P, C)
        assert time.monotonic() - t0 < 0.2 and out.metrics["reward/hang/timeouts"] == 3
    finally:
        release.set()


def test_busy_python_loop_times_out_too():
    stop = threading.Event()

    def spin(prompts, completions, **columns):
        while not stop.is_set():
            pass
        return [0.0] * len(completions)

    try:
        t0 = time.monotonic()
        res = rewards.call_with_deadline(spin, P, C, timeout_s=0.3)
        assert res.status == "timeout" and time.monotonic() - t0 < 0.3 + 0.3
    finally:
        stop.set()


def test_rewards_run_concurrently():
    def slow(prompts, completions, **columns):
        time.sleep(0.4)
        return [1.0] * len(completions)

    combined = rewards.CombinedReward([(f"slow{i}", slow, 1.0, 5.0, "skip") for i in range(3)])
    t0 = time.monotonic()
    assert combined(P, C) == [3.0, 3.0, 3.0]
    assert time.monotonic() - t0 < 0.9  # 3 x 0.4 s in sequence would be 1.2 s


def test_raising_reward_is_an_error_and_the_sample_is_skipped(caplog):
    def boom(prompts, completions, **columns):
        raise ZeroDivisionError("bad reward")

    combined = rewards.CombinedReward([("boom", boom, 1.0, 5.0, "skip"), ("ok", const(1.0), 1.0, 5.0, "skip")])
    with caplog.at_level("WARNING", logger="rewards"):
        out = combined.score(P, C)
    assert out.total == [None, None, None]  # never a silent 0
    assert out.metrics["reward/boom/errors"] == 3 and out.metrics["reward/ok/mean"] == 1.0
    assert "ZeroDivisionError: bad reward" in caplog.text

    zero = rewards.CombinedReward([("boom", boom, 1.0, 5.0, "zero"), ("ok", const(1.0), 1.0, 5.0, "skip")])
    out = zero.score(P, C)
    assert out.total == [1.0, 1.0, 1.0] and out.metrics["reward/boom/zeroed"] == 3
    assert out.metrics["reward/boom/errors"] == 3

    strict = rewards.CombinedReward([("boom", boom, 1.0, 5.0, "raise")])
    with pytest.raises(RewardError, match="reward 'boom' failed .*ZeroDivisionError"):
        strict.score(P, C)


@pytest.mark.parametrize("bad, errors", [
    (lambda n: [1.0, float("nan"), 1.0], 1),        # NaN: that sample only
    (lambda n: [1.0, float("inf"), None], 1),       # inf: that sample; None: a plain skip
])
def test_non_finite_scores_are_errors_not_zeros(bad, errors):
    def reward(prompts, completions, **columns):
        return bad(len(completions))

    out = rewards.CombinedReward([("r", reward, 1.0, 5.0, "skip")]).score(P, C)
    assert out.metrics["reward/r/errors"] == errors
    assert 0.0 not in out.total


@pytest.mark.parametrize("bad, what", [
    (lambda n: [1.0] * (n - 1), "got 2 for 3"),     # wrong length
    (lambda n: "1.0", "got str"),                   # not a list
    (lambda n: [1.0, "x", 1.0], "got str"),         # not a number
])
@pytest.mark.parametrize("on_error", ["skip", "zero"])
def test_a_broken_contract_raises_on_the_first_call_whatever_on_error(bad, what, on_error):
    def reward(prompts, completions, **columns):
        return bad(len(completions))

    with pytest.raises(RewardError, match=f"reward 'r' broke the reward contract: .*{what}.*a list of 3 floats"):
        rewards.CombinedReward([("r", reward, 1.0, 5.0, on_error)]).score(P, C)


def test_weighted_sum_and_none_rule():
    def half_none(prompts, completions, **columns):
        return [1.0, None, 3.0]

    specs = [("a", const(1.0), 2.0, 5.0, "skip"), ("b", half_none, 0.5, 5.0, "skip"),
             ("watch", const(100.0), 0.0, 5.0, "skip")]
    out = rewards.CombinedReward(specs).score(P, C)
    assert out.total == [2.5, None, 3.5]  # 2*1 + 0.5*b; b's None skips sample 1; weight 0 never counts
    assert out.per_reward["b"] == [1.0, None, 3.0]
    assert out.metrics["reward/b/mean"] == 2.0 and out.metrics["reward/b/skipped"] == 1
    assert out.metrics["reward/watch/mean"] == 100.0
    assert out.metrics["reward/total/mean"] == 3.0

    specs[1] = ("b", half_none, 0.5, 5.0, "zero")
    out = rewards.CombinedReward(specs).score(P, C)
    assert out.total == [2.5, 2.0, 3.5] and out.metrics["reward/b/zeroed"] == 1


def test_sub_metrics_and_reported_failures():
    class WithMetrics:
        def __call__(self, prompts, completions, **columns):
            self.last_metrics = {"accuracy": 0.5, "timeouts": 1, "errors": 2}
            return [1.0, None, 0.0]

    out = rewards.CombinedReward([("m", WithMetrics(), 1.0, 5.0, "skip")]).score(P, C)
    assert out.metrics["reward/m/accuracy"] == 0.5
    assert out.metrics["reward/m/timeouts"] == 1 and out.metrics["reward/m/errors"] == 2
    assert "reward/m/seconds" in out.metrics


def test_columns_must_align():
    combined = rewards.CombinedReward([("a", const(1.0), 1.0, 5.0, "skip")])
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        combined.score(P, C, answer=["1", "2"])
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        combined.score(P[:2], C)


def test_from_config_specs_and_errors():
    combined = rewards.from_config([RewardSpec(name="format", weight=2.0, on_error="zero", timeout_s=3),
                                    {"name": "examples/my_reward.py:brevity", "options": {"max_chars": 5}}])
    m = combined.members
    assert [(x.key, x.weight, x.timeout_s, x.on_error) for x in m] == [
        ("format", 2.0, 3.0, "zero"), ("brevity", 1.0, 10.0, "skip")]
    with pytest.raises(UserError, match="on_error must be one of skip, zero, raise"):
        rewards.from_config([{"name": "format", "on_error": "ignore"}])
    with pytest.raises(UserError, match=r"unknown key\(s\) \['wieght'\]"):
        rewards.from_config([{"name": "format", "wieght": 1}])
    with pytest.raises(UserError, match="timeout_s must be a positive"):
        rewards.from_config([{"name": "format", "timeout_s": 0}])
    with pytest.raises(Exception, match="on_error"):
        RewardSpec(name="math", on_error="ignore")


def test_docstring_examples_run():
    """The small input/output examples in the rewards and data docstrings are tests too."""
    import doctest
    import importlib

    for name in ("rewards.base", "rewards.workers", "rewards.registry", "rewards.math", "rewards.math_extract",
                 "rewards.safety", "data.arithmetic", "data.safety", "data"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed"
    example = sys.modules[rewards.resolve(f"{ROOT}/examples/my_reward.py:brevity").__module__]
    result = doctest.testmod(example)
    assert result.attempted and result.failed == 0
