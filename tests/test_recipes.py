"""Every shipped recipe loads and dry-runs; the plan's counts and memory estimate behave."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from posttrain.recipe import available_recipes, load_config
from posttrain.errors import UserError
from posttrain.model import PRESETS, param_counts
from posttrain.plan import GiB, plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

RECIPES = ["demo", "it_12b", "it_1b", "it_270m", "it_27b", "it_4b", "it_4b_128k", "qat_12b", "qat_1b", "qat_270m", "qat_27b", "qat_4b",
           "qat_demo", "smoke", "vision_demo"]


@pytest.fixture(autouse=True)
def _no_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_shipped_recipes():
    assert available_recipes() == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run(recipe, tmp_path, capsys):
    assert train.main([f"recipe={recipe}", "dry_run=true", f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# resolved config: {recipe}\n") and f"plan for '{recipe}'" in out
    saved = tmp_path / recipe / "resolved_config.yaml"
    assert yaml.safe_load(saved.read_text())["name"] == recipe
    cfg = load_config([f"recipe={recipe}"])
    p = plan(cfg)
    assert set(p.stages) == {s for s in cfg.stages if s != "export"}
    assert 0 < p.peak_bytes
    if cfg.model.student.dtype == "bfloat16":  # GPU recipes must fit the 80 GB card they are planned for
        assert p.peak_bytes < 80 * GiB, p.format()
    # the saved config reproduces the run
    assert load_config([f"recipe={saved}"]) == load_config([f"recipe={recipe}", "dry_run=true", f"run_dir={tmp_path}"])


def test_dry_run_in_a_real_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    out = subprocess.run([sys.executable, "train.py", "recipe=it_4b", "dry_run=true", f"run_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "peak" in out.stdout and "ZeRO stage 3" in out.stdout and out.stderr == ""
    assert (tmp_path / "it_4b" / "resolved_config.yaml").exists()


def test_inherited_recipes_change_only_sizes():
    small = load_config(["recipe=it_270m"])
    assert (small.model.student.preset, small.model.teacher.preset) == ("270m", "1b")
    assert small.model.student.dtype == "bfloat16" and small.distill.num_samples == 256  # from it_4b
    assert small.distributed.zero_stage == 0 and small.data.max_seq_len == 2048


def test_plan_parameter_counts_match_the_model():
    p = plan(load_config(["recipe=it_4b"]))
    expected = param_counts(PRESETS["4b"])
    assert p.models["student"].counts == expected
    assert p.models["teacher"].counts == param_counts(PRESETS["27b"])
    assert expected["non_embedding"] == 3_209_010_688  # the report's 3,209M
    assert expected["total"] - expected["vision"] == 3_880_263_168  # the text model: 3.88 B
    assert "4.30 B" in p.format() and "419.8 M" in p.format()  # with the SigLIP tower and projector


def test_plan_formula_for_one_case():
    # distill on 8 devices, ZeRO-3, bf16: 2P weights, 2T grads and 12T Adam states, all over 8, where T
    # leaves out the vision tower and projector (frozen by default: model.train_vision_tower/_projector).
    cfg = load_config(["recipe=it_4b", "stages=[distill]"])
    counts = param_counts(PRESETS["4b"])
    P, T = counts["total"], counts["total"] - counts["vision"]
    rows = plan(cfg).stages["distill"].rows
    assert rows["trained weights"] == 2 * P // 8 and rows["gradients"] == 2 * T // 8
    assert rows["Adam states"] == 12 * T // 8
    rows = plan(load_config(["recipe=it_4b", "stages=[distill]", "model.train_vision_tower=true",
                             "model.train_projector=true"])).stages["distill"].rows
    assert rows["gradients"] == 2 * P // 8 and rows["Adam states"] == 12 * P // 8
    assert rows["teacher (frozen)"] == 2 * param_counts(PRESETS["27b"])["total"] // 8
    rows = plan(load_config(["recipe=it_4b", "stages=[distill]", "distributed.zero_stage=1"])).stages["distill"].rows
    assert rows["trained weights"] == 2 * P and rows["gradients"] == 2 * T and rows["Adam states"] == 12 * T // 8
    cpu = plan(load_config(["recipe=it_4b", "stages=[distill]", "model.student.dtype=float32",
                            "distributed.zero_stage=0"])).stages["distill"].rows
    assert (cpu["trained weights"], cpu["gradients"], cpu["Adam states"]) == (4 * P, 4 * T, 8 * T)
    offload = plan(load_config(["recipe=it_4b", "stages=[distill]", "distributed.offload_optimizer=true"]))
    assert offload.stages["distill"].rows["Adam states"] == 0 and "host memory" in offload.format()


@pytest.mark.parametrize("recipe", ["it_4b", "it_27b", "smoke"])
def test_memory_shrinks_with_zero_stage(recipe):
    peaks = [plan(load_config([f"recipe={recipe}", f"distributed.zero_stage={z}", "distributed.world_size=8",
                               "distributed.nodes=1"])).peak_bytes for z in range(4)]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4, peaks


def test_memory_shrinks_with_world_size_under_zero3():
    peaks = [plan(load_config(["recipe=it_12b", f"distributed.world_size={w}", "distributed.nodes=1"])).peak_bytes
             for w in (1, 2, 8, 32)]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4, peaks


def test_activation_checkpointing_and_cached_targets_reduce_memory():
    base = plan(load_config(["recipe=it_4b"])).stages["distill"]
    no_ckpt = plan(load_config(["recipe=it_4b", "distributed.activation_checkpointing=false"])).stages["distill"]
    cached = plan(load_config(["recipe=it_4b", "distill.cache_targets=true"])).stages["distill"]
    assert no_ckpt.train["activations"] > 5 * base.train["activations"]
    assert cached.peak < base.peak and "teacher (frozen)" not in cached.rows


def test_plan_reads_a_source_architecture(tmp_path):
    from posttrain.hf_config import config_to_hf
    import json

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(PRESETS["1b"])))
    p = plan(load_config(["recipe=it_1b", f"model.student.source={tmp_path}"]))
    assert p.models["student"].arch == PRESETS["1b"] and p.models["student"].origin == str(tmp_path)
    p = plan(load_config(["recipe=it_1b", f"model.student.source={tmp_path}", "model.student.preset=null"]))
    assert p.models["student"].arch == PRESETS["1b"]
    with pytest.raises(UserError, match="is not the '4b' architecture"):
        plan(load_config(["recipe=it_4b", f"model.student.source={tmp_path}"]))
    with pytest.raises(UserError, match="does not exist"):
        plan(load_config(["recipe=it_4b", f"model.student.source={tmp_path / 'missing'}"]))


@pytest.mark.parametrize("samples", [2, 4])
def test_plan_trains_as_many_jbond_rows_as_the_code(samples):
    """policy.bond_step trains, per prompt, its samples_per_prompt policy samples and the best anchor
    sample, in passes of whole prompts (policy.rows_per_pass): the plan's train step is that of a distill
    step with one pass's rows (samples 2: both prompts, 6 rows; samples 4: one prompt, 5 rows)."""
    cfg = load_config(["recipe=it_4b", "stages=[policy]", "policy.algorithm=bond",
                       f"policy.samples_per_prompt={samples}"])
    rows = cfg.policy.prompts_per_pass(cfg.data.micro_batch_size, samples + 1) * (samples + 1)
    assert rows == {2: 6, 4: 5}[samples]
    same = load_config(["recipe=it_4b", "stages=[distill]", f"data.micro_batch_size={rows}"])
    policy, distill = plan(cfg).stages["policy"].train, plan(same).stages["distill"].train
    vision = policy.pop("vision activations"), distill.pop("vision activations")
    # with several passes (samples 4: two) and the embedding trained (it_4b), the fused head's float32
    # V x C gradient sits beside the earlier passes' gradients; one pass (samples 2) has none
    arch = plan(cfg).models["student"].arch
    head = 4 * arch.vocab_size * arch.hidden_size
    assert policy.pop("head gradient (fp32)", None) == (head if samples == 4 else None)
    assert policy == distill
    # the tower encodes each prompt's images once, however many samples it has
    one_per_prompt = load_config(["recipe=it_4b", "stages=[distill]"])
    assert vision[0] == plan(one_per_prompt).stages["distill"].train["vision activations"] < vision[1]


def test_plan_counts_the_vision_towers_activations():
    # it_4b: micro-batch 2, bf16, one 896 x 896 image per row: 4096 patches of width 1152 (MLP 4304)
    per_layer = 4096 * (8 * 1152 + 2 * 4304) * 2
    soft = 256 * 2560 * 2
    frozen = plan(load_config(["recipe=it_4b", "stages=[distill]"]))
    assert frozen.stages["distill"].train["vision activations"] == 2 * (per_layer + soft)
    trained = plan(load_config(["recipe=it_4b", "stages=[distill]", "model.train_vision_tower=true"]))
    assert trained.stages["distill"].train["vision activations"] == 2 * (27 * per_layer + soft)
    assert trained.peak_bytes > frozen.peak_bytes and "vision activations" in trained.format()
    crops = plan(load_config(["recipe=it_4b", "stages=[distill]", "data.pan_and_scan=true"]))
    assert crops.stages["distill"].train["vision activations"] == 10 * (per_layer + soft)
    assert "vision activations" not in plan(load_config(["recipe=smoke"])).stages["distill"].train


def test_distill_peak_is_its_larger_phase_teacher_targets_or_the_train_step():
    """The live teacher's targets (logits, log-probs and Gumbel keys of one chunk; no keys for topk) run
    before the student's forward, so the peak is the larger phase, not their sum (measured at 8K, README)."""
    from posttrain.plan import plan

    GiB = 1024**3
    base = ["recipe=demo", "stages=[distill]", "data.max_seq_len=8192", "data.micro_batch_size=1",
            "distributed.zero_stage=0", "distributed.activation_checkpointing=true", "data.loss_chunk_tokens=1024"]
    sampled = plan(load_config(base)).stages["distill"]
    assert sampled.targets == {"logits chunk": 3 * GiB} and sampled.train["logits chunk"] == 2 * GiB
    assert sampled.peak == sum(sampled.rows.values()) + max(sum(sampled.targets.values()),
                                                            sum(sampled.train.values()))
    assert sum(sampled.targets.values()) > sum(sampled.train.values())  # at 8K the targets phase is the peak
    topk = plan(load_config(base + ["distill.method=topk", "distill.label_weight=0"])).stages["distill"]
    assert topk.targets == {"logits chunk": 2 * GiB}
    cached = plan(load_config(base + ["distill.cache_targets=true"])).stages["distill"]
    assert not cached.targets and "teacher (frozen)" not in cached.rows
