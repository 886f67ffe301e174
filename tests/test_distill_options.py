"""Two distill-stage knobs the demo relies on.

- distill.label_weight mixes the data's own next token into the sampled targets: the loss is
  (1 - w) x the report's distillation loss + w x cross-entropy on the label, in one head pass;
- model.freeze_embeddings keeps the tied embedding (the output head) exactly as loaded while the
  rest of the model trains, and leaves it out of the optimizer.
"""
from __future__ import annotations

import pytest
import torch
from launch import train_py
from safetensors.torch import load_file

from posttrain.config import DistillSection
from posttrain.stages.distill import with_labels
from posttrain.losses import chunked_cross_entropy, chunked_sampled_distillation, sample_teacher_targets


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_label_weight_mixes_distillation_and_cross_entropy(w):
    g = torch.Generator().manual_seed(0)
    n, C, V = 10, 8, 41
    h = torch.randn(n, C, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, C, generator=g, dtype=torch.float64)
    ids, probs = sample_teacher_targets(torch.randn(n, V, generator=g, dtype=torch.float64), k=6, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    mixed_ids, mixed_q = with_labels(ids, probs, labels, w)
    assert mixed_ids.shape == (n, 7) and torch.allclose(mixed_q.sum(-1), torch.ones(n, dtype=mixed_q.dtype))
    got = chunked_sampled_distillation(h, W, mixed_ids, mixed_q, chunk_tokens=4)
    want = (1 - w) * chunked_sampled_distillation(h, W, ids, probs, chunk_tokens=4) \
        + w * chunked_cross_entropy(h, W, labels, chunk_tokens=4)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)  # the mixed targets are float32
    (g1,) = torch.autograd.grad(got, h)
    (g2,) = torch.autograd.grad(want, h)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_label_weight_needs_sampled_targets():
    with pytest.raises(ValueError, match="label_weight=0.5 needs method=sampled"):
        DistillSection(method="topk", label_weight=0.5)
    with pytest.raises(ValueError):
        DistillSection(label_weight=1.5)


def test_freeze_embeddings_keeps_the_head_and_trains_the_rest(tmp_path):
    base = ["recipe=smoke", "stages=[distill]", "distill.warmup_steps=0", "distill.eval_every=0", "data.eval=null",
            "distill.label_weight=0.5"]
    runs = {}
    for name, extra in [("init", ["distill.steps=0"]), ("frozen", ["distill.steps=2", "model.freeze_embeddings=true"]),
                        ("free", ["distill.steps=2"])]:
        res = train_py([*base, *extra, f"run_dir={tmp_path / name}"], timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        final = tmp_path / name / "smoke" / "distill" / "final"  # a frozen embedding is a shard of its own
        runs[name] = {k: v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(f).items()}
    emb = next(k for k in runs["init"] if k.endswith("embed_tokens.weight"))
    others = [k for k in runs["init"] if k != emb and k.endswith("proj.weight")]
    assert torch.equal(runs["frozen"][emb], runs["init"][emb])
    assert not torch.equal(runs["free"][emb], runs["init"][emb])  # the same run unfrozen does move it
    assert all(not torch.equal(runs["frozen"][k], runs["init"][k]) for k in others)
