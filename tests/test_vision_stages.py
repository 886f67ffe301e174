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
                    f"export.dir={tmp_path / 'export'}", "export.dtype=float32"], timeout=600)
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
