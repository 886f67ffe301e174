"""The config system: schema, recipe loading, key=value overrides and their error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.config import Config, ModelSpec
from posttrain.recipe import all_keys, build_config, describe_keys, load_config, parse_value, save_config
from posttrain.errors import UserError
from posttrain.model import PRESETS
from posttrain.plan import check_arch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the repo root is not a package)


@pytest.fixture(autouse=True)
def _no_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        load_config(argv)
    return str(e.value)


# ----------------------------------------------------------------------------- schema

def test_defaults_are_valid_and_follow_the_papers():
    cfg = Config()  # gemma_pytorch's default failing its own validator is the cautionary tale
    assert cfg.distill.num_samples == 256 and cfg.distill.method == "sampled"
    assert (cfg.policy.beta, cfg.policy.eta, cfg.policy.anchor_samples) == (0.5, 0.02, 2)
    assert (cfg.policy.warp_mu, cfg.policy.warp_beta, cfg.policy.liti_eta, cfg.policy.warp_runs) == (0.01, 0.1, 0.3, 2)
    assert (cfg.warm.members, cfg.warm.lrs, cfg.warm.dropouts) == (6, [1e-5, 4e-5, 1e-4], [0.05, 0.1])
    assert cfg.distributed.world_size == 1


def test_every_key_is_documented():
    text = describe_keys()
    for key in all_keys():
        if ".arch." in key:
            continue  # GemmaConfig fields, documented in model.py
        line = next(line for line in text.splitlines() if line.strip().startswith(key + " ") or
                    line.startswith(key + ":"))
        assert line.split(":", 1)[1].strip() not in ("", "None"), key


def test_strict_types():
    assert build_config({"distill": {"lr": 1}}).distill.lr == 1.0  # int for float is fine
    for raw in ({"distill": {"steps": "10"}}, {"distill": {"steps": 10.0}}, {"distill": {"steps": True}},
                {"distill": {"lr": "1e-5"}}, {"dry_run": "true"}, {"tracking": {"tags": "a"}}):
        with pytest.raises(UserError):
            build_config(raw)


def test_world_size_defaults_to_env_and_override_wins(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Config().distributed.world_size == 4
    assert load_config(["recipe=smoke"]).distributed.world_size == 4
    assert load_config(["recipe=smoke", "distributed.world_size=16"]).distributed.world_size == 16


def test_cross_field_rules():
    msg = error_of(["recipe=it_4b", "model.teacher=null"])
    assert "needs a teacher" in msg and "model.teacher=null" in msg
    assert "pipeline order" in error_of(["recipe=it_4b", "stages=[policy,distill]"])
    assert "at least one reward" in error_of(["recipe=it_4b", "rewards=[]"])
    assert "set source" in error_of(["recipe=it_4b", "model.student.preset=null"])
    assert "divisible" in error_of(["recipe=it_4b", "model.student.arch.num_heads=3"])
    assert "did you mean 'num_layers'" in error_of(["recipe=it_4b", "model.student.arch.num_layer=3"])
    assert "needs distributed.zero_stage" in error_of(["recipe=it_4b", "distributed.offload_optimizer=true",
                                                      "distributed.zero_stage=0"])
    cfg = load_config(["recipe=it_4b", "model.teacher=null", "stages=[warm,policy,export]"])
    assert cfg.model.teacher is None


def test_arch_changes_the_preset():
    spec = ModelSpec(preset="270m", arch={"num_layers": 2, "hidden_size": 64})
    arch = spec.preset_config()
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size) == (2, 64, PRESETS["270m"].vocab_size)
    assert len(arch.layer_types) == 2
    with pytest.raises(ValueError, match="needs preset"):
        ModelSpec(source="x.gguf", arch={"num_layers": 2})


def test_source_must_match_preset():
    check_arch("student", ModelSpec(source="/ckpt", preset="4b"), PRESETS["4b"])
    with pytest.raises(UserError, match="hidden_size 1152 vs 2560"):
        check_arch("student", ModelSpec(source="/ckpt", preset="4b"), PRESETS["1b"])


# ----------------------------------------------------------------------------- overrides

def test_overrides_apply_with_types():
    cfg = load_config([
        "recipe=it_4b", "distill.lr=1e-5", "distill.steps=20", "model.student.source=/ckpt/gemma-3-4b-pt",
        "tracking.tags=[a,b]", "rewards=[{name: math, weight: 2}, {name: code}]", "rewards.1.weight=0.5",
        "name=2024", "tracking.run_name=1.10", "dry_run=true", "distributed.ds_config.gradient_clipping=0.5",
        "model.student.arch.num_layers=2",
    ])
    assert cfg.distill.lr == 1e-5 and isinstance(cfg.distill.lr, float)
    assert cfg.distill.steps == 20 and isinstance(cfg.distill.steps, int)
    assert cfg.model.student.source == "/ckpt/gemma-3-4b-pt"
    assert cfg.tracking.tags == ["a", "b"]
    assert [(r.name, r.weight) for r in cfg.rewards] == [("math", 2.0), ("code", 0.5)]
    assert cfg.name == "2024" and cfg.tracking.run_name == "1.10"  # strings stay as typed
    assert cfg.dry_run is True
    assert cfg.distributed.ds_config == {"gradient_clipping": 0.5}
    # YAML reads a bare `off` as false; the knob whose value is "off" takes it as written
    assert load_config(["recipe=demo", "distributed.autocast=off"]).distributed.autocast == "off"
    with pytest.raises(UserError, match="distributed.autocast"):
        load_config(["recipe=demo", "distributed.autocast=on"])
    assert cfg.model.student.preset_config().num_layers == 2
    # untouched keys keep the recipe's values
    assert cfg.model.teacher.preset == "27b" and cfg.distill.num_samples == 256


def test_yaml_values():
    assert parse_value("1e-5") == 1e-5 and parse_value("3e4") == 3e4 and parse_value("-2E-3") == -2e-3
    assert parse_value("null") is None and parse_value("[1, 2]") == [1, 2] and parse_value("8") == 8


def test_unknown_key_suggests_the_close_one():
    assert error_of(["recipe=it_4b", "distil.lr=1e-5"]) == "unknown key 'distil.lr'; did you mean 'distill.lr'?"
    assert "did you mean 'model.student.source'" in error_of(["recipe=it_4b", "model.student.sorce=x"])
    assert "did you mean 'rewards.0.name'" in error_of(["recipe=it_4b", "rewards.0.nme=x"])
    assert "did you mean 'rewards.0.weight'" in error_of(["recipe=it_4b", "rewards=[{name: m, wieght: 2}]"])
    assert "has 4 entries" in error_of(["recipe=it_4b", "rewards.9.weight=1"])


def test_wrong_type_names_key_value_and_type():
    msg = error_of(["recipe=it_4b", "distill.steps=abc"])
    assert msg.startswith("'distill.steps' expects an integer, got 'abc'")
    assert "command line 'distill.steps=abc'" in msg and "distill.steps=1000" in msg
    assert "one of 'bond', 'warp' or 'bond_then_warp'" in error_of(["recipe=it_4b", "policy.algorithm=ppo"])


def test_malformed_arguments():
    assert "fix: write it as distill.lr=<value>" in error_of(["recipe=it_4b", "distill.lr"])
    assert "without dashes" in error_of(["recipe=it_4b", "--lr=3"])
    assert "not valid YAML" in error_of(["recipe=it_4b", "rewards=[{name: math"])
    assert "no recipe given" in error_of(["distill.lr=1"])


# ----------------------------------------------------------------------------- recipes

def test_unknown_recipe_lists_available():
    msg = error_of(["recipe=it_4x"])
    assert "unknown recipe 'it_4x' (did you mean 'it_4b'?)" in msg
    assert "demo, it_12b, it_1b, it_270m, it_27b, it_4b, it_4b_128k, qat_12b, qat_1b, qat_270m, qat_27b, qat_4b, qat_demo, smoke" in msg


def test_base_inheritance_merges_and_detects_loops(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: smoke\ndistill: {steps: 7}\ntracking: {tags: [p]}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ndistill: {lr: 0.5}\n")
    cfg = load_config([f"recipe={tmp_path / 'child.yaml'}"])
    assert (cfg.distill.steps, cfg.distill.lr, cfg.tracking.tags) == (7, 0.5, ["p"])
    assert cfg.model.student.arch["num_layers"] == 6 and cfg.name == "child"
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "loops: a.yaml -> b.yaml -> a.yaml" in error_of([f"recipe={tmp_path / 'a.yaml'}"])


def test_recipe_yaml_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndistill:\n  lr: 1\n    steps: 2\n")
    msg = error_of([f"recipe={bad}"])
    assert f"{bad}, line 4: YAML syntax error" in msg
    (tmp_path / "typo.yaml").write_text("base: smoke\ndistill: {stepz: 2}\n")
    msg = error_of([f"recipe={tmp_path / 'typo.yaml'}"])
    assert "unknown key 'distill.stepz'" in msg and "typo.yaml" in msg and "did you mean 'distill.steps'" in msg


def test_resolved_config_is_saved_and_reloads(tmp_path):
    cfg = load_config(["recipe=it_4b", "distill.lr=2e-6", f"run_dir={tmp_path}"])
    path = save_config(cfg)
    assert path == tmp_path / "it_4b" / "resolved_config.yaml"
    assert yaml.safe_load(path.read_text())["distill"]["lr"] == 2e-6
    assert load_config([f"recipe={path}"]) == cfg


# ----------------------------------------------------------------------------- train.py

@pytest.mark.parametrize("argv, expected", [
    (["recipe=nope"], "error: unknown recipe 'nope'; available: demo,"),
    (["recipe=it_4b", "distil.lr=1e-5"], "error: unknown key 'distil.lr'; did you mean 'distill.lr'?"),
    (["recipe=it_4b", "distill.steps=ten"], "error: 'distill.steps' expects an integer, got 'ten'"),
    (["recipe=it_4b", "distill.lr"], "error: argument 'distill.lr' is not key=value"),
])
def test_train_errors_are_one_clear_line(argv, expected, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err


def test_train_error_exit_code_in_a_real_process(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "recipe=it_4b", "distil.lr=1e-5", f"run_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr == "error: unknown key 'distil.lr'; did you mean 'distill.lr'?\n"
    assert not (tmp_path / "it_4b").exists()


def test_help_lists_keys(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --nproc_per_node=2 train.py recipe=smoke" in out and "distill.num_samples (int = 256)" in out


def test_optimizer_knobs_reach_deepspeed_and_warmups_default_as_before():
    from posttrain.engine import default_warmup, ds_config

    conf = ds_config(load_config(["recipe=smoke"]), lr=1e-4, grad_accum=1)
    assert conf["gradient_clipping"] == 1.0  # today's values are the defaults
    assert conf["optimizer"]["params"] | {"torch_adam": None, "fused": None} == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                                   "weight_decay": 0.0, "torch_adam": None, "fused": None}
    cfg = load_config(["recipe=smoke", "distributed.grad_clip=0.5", "distributed.adam_betas=[0.8,0.95]",
                       "distributed.adam_eps=1e-6", "distributed.weight_decay=0.1", "distributed.ds_config.steps_per_print=7"])
    conf = ds_config(cfg, lr=1e-4, grad_accum=1)
    assert conf["gradient_clipping"] == 0.5 and conf["steps_per_print"] == 7
    params = conf["optimizer"]["params"]
    assert (params["betas"], params["eps"], params["weight_decay"]) == ([0.8, 0.95], 1e-6, 0.1)
    assert [default_warmup(s, None) for s in (8, 300, 1000)] == [0, 30, 50]  # min(steps // 10, 50)
    assert default_warmup(1000, 7) == 7
    cfg = load_config(["recipe=smoke", "warm.warmup_steps=3", "policy.warmup_steps=0"])
    assert (cfg.warm.warmup_steps, cfg.policy.warmup_steps, load_config(["recipe=smoke"]).warm.warmup_steps) == (3, 0, None)
    with pytest.raises(UserError, match=r"adam_betas must be \[beta1, beta2\].*fix: e.g."):
        load_config(["recipe=smoke", "distributed.adam_betas=[0.9,1.0]"])


@pytest.mark.parametrize("key, stage", [("train", "distill"), ("preferences", "warm"), ("prompts", "policy")])
def test_a_stage_without_its_data_is_found_before_any_weights_load(key, stage, tmp_path):
    """Not after the stages before it have trained: train.py stops right after reading the config, with
    one error line and exit 2; a dry run lists the problem in its plan and exits 0."""
    nowhere = "model.student.source=/nonexistent/weights"  # loading any weights would fail differently
    res = subprocess.run([sys.executable, "train.py", "recipe=smoke", f"data.{key}=null", f"run_dir={tmp_path}",
                          nowhere], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith(f"error: stage '{stage}' needs data.{key} "), res.stderr
    assert f"fix: e.g. data.{key}=" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "train.py", "recipe=smoke", f"data.{key}=null", "dry_run=true",
                          f"run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and f"not runnable as it is: stage '{stage}' needs data.{key}" in res.stdout + res.stderr
