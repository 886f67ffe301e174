"""Quantization-aware training: the fake-quantized model everywhere it computes, the int4 export, and
the qat stage through train.py (2 ranks, ZeRO-3, SIGKILL then resume).

- set_format makes the forward, the sampler (packed and plain paths) and save_pretrained use the
  quantized values while the parameters stay float (the master weights QAT trains);
- the int4 safetensors hold 4-bit codes and per-row scales, and load_int4 gives back the quantized
  model's logits;
- the stage's held-out "before" is post-training quantization, its final model and GGUF hold the
  quantized values, and a run killed with SIGKILL resumes to the same losses and weights.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from launch import kill_all, train_py
from safetensors import safe_open
from safetensors.torch import load_file

from posttrain.checkpoint import load_model, save_pretrained
from posttrain.int4_export import FILE, load_int4, write_int4
from posttrain.model import GemmaConfig, build_model
from posttrain.plan import plan
from posttrain.quant import FORMATS, int4, q4_0, quantize_linear_, set_format
from posttrain.recipe import load_config
from posttrain.sampler import Sampler

TINY = GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2, num_kv_heads=1,
                   head_dim=32, query_pre_attn_scalar=32, sliding_window=8, layer_types=("sliding_attention",
                                                                                            "sliding_attention",
                                                                                            "full_attention"))


def tiny(seed: int = 0):
    return build_model(TINY, seed=seed).eval()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_set_format_quantizes_the_forward_and_keeps_float_parameters(fmt):
    model = tiny()
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    reference = quantize_linear_(copy.deepcopy(model), fmt)
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = model(ids)
    set_format(model, fmt)
    assert torch.allclose(model(ids), reference(ids), atol=1e-6)
    assert not torch.allclose(model(ids), plain, atol=1e-4)  # it does change the model
    assert all(torch.equal(floats[k], v) for k, v in model.state_dict().items())  # master weights untouched
    set_format(model, None)
    assert torch.equal(model(ids), plain)


def test_quantized_embedding_option_quantizes_lookup_and_head():
    model = set_format(tiny(), "q4_0", embedding=True)
    reference = quantize_linear_(copy.deepcopy(model), "q4_0")
    with torch.no_grad():
        reference.embed_tokens.weight.copy_(q4_0(reference.embed_tokens.weight))
    set_format(reference, None)
    ids = torch.randint(0, TINY.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(model(ids), reference(ids), atol=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_sampler_samples_from_the_quantized_weights(packed):
    model = set_format(tiny(), "int4")
    reference = set_format(quantize_linear_(copy.deepcopy(model), "int4"), None)
    prompts = [[2, 5, 9, 11], [2, 7]]
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=[])
    ours = Sampler(model, pack_weights=packed).generate(prompts, **kw)
    theirs = Sampler(reference, pack_weights=packed).generate(prompts, **kw)
    floats = Sampler(set_format(copy.deepcopy(model), None), pack_weights=packed).generate(prompts, **kw)
    flat = [c for group in ours for c in group]
    ref = [c for group in theirs for c in group]
    assert [c.tokens for c in flat] == [c.tokens for c in ref]
    for a, b in zip(flat, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert any(a.logprobs != pytest.approx(c.logprobs, abs=1e-4) for a, c in zip(flat, (c for g in floats for c in g)))


def test_save_pretrained_writes_the_quantized_values(tmp_path):
    model = set_format(tiny(), "q4_0")
    save_pretrained(model, None, tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    w = model.layers[1].mlp.down_proj.weight
    assert torch.equal(loaded.layers[1].mlp.down_proj.weight, q4_0(w))
    assert not torch.equal(loaded.layers[1].mlp.down_proj.weight, w)
    assert torch.equal(loaded.layers[1].input_layernorm.weight, model.layers[1].input_layernorm.weight)


def test_int4_checkpoint_layout_and_round_trip(tmp_path):
    model = tiny()
    sizes = write_int4(model, None, tmp_path, embedding_dtype=torch.float32)
    with safe_open(str(tmp_path / FILE), framework="pt") as f:
        assert f.metadata()["format"] == "posttrain-int4"
        q = f.get_tensor("layers.0.mlp.down_proj.qweight")
        s = f.get_tensor("layers.0.mlp.down_proj.scale")
    assert q.dtype == torch.uint8 and tuple(q.shape) == (64, 64) and tuple(s.shape) == (64,)
    linears = [m.weight for m in model.modules() if hasattr(m, "quant")]
    bits = 8 * sum(w.numel() / 2 + 4 * w.shape[0] for w in linears) / sum(w.numel() for w in linears)
    assert sizes["linear_bits_per_weight"] == pytest.approx(bits)  # 4 bits + a float32 scale per row
    loaded = load_int4(tmp_path)
    for name, p in quantize_linear_(copy.deepcopy(model), "int4").state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    quantized = set_format(copy.deepcopy(model), "int4")
    assert (loaded(ids) - quantized(ids)).abs().max() < 1e-4
    assert torch.equal(loaded.layers[2].self_attn.q_proj.weight, int4(model.layers[2].self_attn.q_proj.weight))


def test_load_int4_names_what_is_wrong(tmp_path):
    with pytest.raises(Exception, match="not an int4 checkpoint"):
        load_int4(tmp_path)


def test_plan_counts_the_float_teacher_and_the_fake_quantized_weights():
    cfg = load_config(["recipe=it_4b", "stages=[qat,export]", "model.teacher=null"])
    stage = plan(cfg).stages["qat"]
    assert stage.rows["teacher (frozen)"] == stage.rows["trained weights"]  # the student's own copy, same shards
    assert stage.train["fake-quant weights"] > 0
    no_ckpt = plan(load_config(["recipe=it_4b", "stages=[qat,export]", "model.teacher=null",
                                "distributed.activation_checkpointing=false"])).stages["qat"]
    # without activation checkpointing the forward keeps every block's quantized weights (34 blocks)
    assert no_ckpt.train["fake-quant weights"] / stage.train["fake-quant weights"] == pytest.approx(34, rel=1e-3)


# ----------------------------------------------------------------------------- the stage, through train.py

STEPS = 6
BASE = ["recipe=smoke", "stages=[qat]", "model.teacher=null", f"qat.steps={STEPS}", "qat.warmup_steps=1",
        "qat.lr=3e-5", "qat.eval_every=0", "qat.eval_batches=2", "checkpoint.every=2", "tracking.log_every=1",
        "data.eval_prompts=[]"]


def run(run_dir: Path, *overrides: str, wait: bool = True):
    res = train_py([*BASE, f"run_dir={run_dir}", *overrides], ranks=2, wait=wait, timeout=400)
    if wait:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "smoke" / "qat" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat_straight")
    run(out)
    return out


def test_stage_reports_ptq_before_and_writes_quantized_files(straight):
    import gguf

    stage = straight / "smoke" / "qat"
    summary = json.loads((stage / "summary.json").read_text())
    assert {"eval/kl", "eval/top1"} <= set(summary["before"]) and {"eval/kl", "eval/top1"} <= set(summary["after"])
    assert summary["before"]["eval/kl"] > 0  # post-training quantization moved the model
    info = summary["exports"]["gguf_q4_0"]
    assert info["linear_bits_per_weight"] == pytest.approx(4.5)
    reader = gguf.GGUFReader(str(stage / "model-q4_0.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    final = load_file(stage / "final" / "model.safetensors")
    w = final["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q4_0(w), w)  # the final model holds quantized values
    table = (straight / "smoke" / "summary.json").read_text()
    assert '"format": "q4_0"' in table


def test_two_rank_zero3_run_resumes_exactly_after_sigkill(straight, tmp_path):
    proc = run(tmp_path, wait=False)
    ckpt = tmp_path / "smoke" / "qat" / "checkpoints" / "step_4"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_all(proc)
    assert ckpt.exists(), proc.stdout.read()[-3000:]
    assert not (tmp_path / "smoke" / "qat" / "final").exists()
    run(tmp_path, "resume=true")
    a, b = losses(straight), losses(tmp_path)
    assert [a[s] for s in range(1, STEPS + 1)] == [b[s] for s in range(1, STEPS + 1)]
    wa = load_file(straight / "smoke" / "qat" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "smoke" / "qat" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact on CPU
