"""The smoke recipe end to end, in one process; its student is multimodal, and text-only
post-training keeps its eyes.

A tiny Gemma3ForConditionalGeneration student goes through the smoke recipe (distill, WARM, J-BOND then
WARP, export) with text data (train.py, real processes, ZeRO-3 as the smoke recipe has it): the text weights change, while the
vision tower and the projector come out bit-identical, and the export still loads in transformers
as Gemma3ForConditionalGeneration with no missing or unexpected keys.
"""
from __future__ import annotations

import pytest
import torch
from launch import train_py
from safetensors.torch import load_file

import posttrain
from posttrain.model import GemmaConfig, build_model
from posttrain.vision import VisionConfig

TINY_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28,
                           patch_size=7, mm_tokens_per_image=4)


def student_dir(tmp_path):
    cfg = GemmaConfig(num_layers=6, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1, head_dim=32,
                      query_pre_attn_scalar=32, sliding_window=8, vision=TINY_VISION)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # a non-trivial projector and norms, as a trained model has
        for name, p in model.named_parameters():
            if name.startswith("multi_modal_projector.") or name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    path = tmp_path / "student"
    posttrain.save_pretrained(model, None, path)
    return path, model


@pytest.mark.slow
def test_smoke_recipe_keeps_a_multimodal_students_vision_tower_bit_identical(tmp_path):
    source, model = student_dir(tmp_path)
    run = tmp_path / "run"
    res = train_py(["recipe=smoke", f"model.student.source={source}", "model.student.preset=null",
                    "model.student.arch={}", f"run_dir={run}",
                    f"export.dir={tmp_path / 'export'}", "export.dtype=float32",
                    "policy.eval_size=8", "policy.eta_sweep=[1.0]"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "student: 17.0M parameters" in res.stdout and "'What is 2 + 3?' ->" in res.stdout
    assert (tmp_path / "export" / "tokenizer.model").exists()
    assert posttrain.read_config(tmp_path / "export").hidden_size == 64
    before = model.state_dict()
    for stage_final in (run / "smoke" / "distill" / "final", tmp_path / "export"):
        after = posttrain.load_model(stage_final).state_dict()
        assert after.keys() == before.keys()
        vision = [k for k in before if k.startswith(("vision_tower.", "multi_modal_projector."))]
        assert len(vision) == 2 * 16 + 5 + 2  # 2 layers x 16 tensors, embeddings, post-LN, projector
        for k in vision:
            assert torch.equal(after[k], before[k]), f"{stage_final}: {k} changed"
        assert not torch.equal(after["layers.0.mlp.up_proj.weight"], before["layers.0.mlp.up_proj.weight"])
    keys = set(load_file(tmp_path / "export" / "model.safetensors").keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    transformers = pytest.importorskip("transformers")
    _, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "export",
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def image_rows(tmp_path, n):
    """Rows in TRL's vision format: a coloured square, the question, its colour as the reply."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rows = []
    for i in range(n):
        name = list(colours)[i % 4]
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40 + i, 30), colours[name]).save(path)
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": name}], "images": [str(path)]})
    return rows


@pytest.mark.slow
def test_distill_with_image_rows_shows_the_teacher_the_same_pixels(tmp_path):
    """Teacher = student at the start: the held-out KL is zero only if the teacher reads the same images.
    The projector trains (model.train_projector), the tower stays as loaded."""
    import json

    source, model = student_dir(tmp_path)
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in image_rows(tmp_path, 8)))
    run = tmp_path / "run"
    res = train_py(["recipe=smoke", "stages=[distill]", f"model.student.source={source}", "model.student.preset=null",
                    "model.student.arch={}", f"model.teacher.source={source}", "model.teacher.preset=null",
                    "model.teacher.arch={}", f"data.train={data}", f"data.eval={data}", "model.train_projector=true",
                    "distill.steps=2", "data.max_seq_len=64", f"run_dir={run}"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run / "smoke" / "distill" / "summary.json").read_text())
    assert summary["before"]["eval/kl"] == pytest.approx(0.0, abs=1e-5), summary["before"]
    assert summary["before"]["eval/top1"] == 1.0
    after = posttrain.load_model(run / "smoke" / "distill" / "final").state_dict()
    before = model.state_dict()
    assert not torch.equal(after["multi_modal_projector.mm_input_projection_weight"],
                           before["multi_modal_projector.mm_input_projection_weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("vision_tower."))


def test_image_rows_need_a_multimodal_model(tmp_path):
    from posttrain.data import tokenize_rows
    from posttrain.errors import UserError
    from posttrain.images import ImageConfig
    from posttrain.tokenizer import load_tokenizer

    tok = load_tokenizer("gemma3-270m")
    rows = image_rows(tmp_path, 2)
    with pytest.raises(UserError, match="text-only"):
        tokenize_rows(rows, tok, 64)
    out = tokenize_rows(rows, tok, 64, images=ImageConfig(size=28, tokens_per_image=4))
    assert out[0].pixel_values.shape == (1, 3, 28, 28) and out[0].ids.count(262_144) == 4
    with pytest.raises(UserError, match="longer than"):  # a cut inside an image drops the row, even truncating
        tokenize_rows(rows, tok, 8, truncation="truncate", images=ImageConfig(size=28, tokens_per_image=4))
