"""Teacher targets cached on disk (`distill.cache_targets`): compact dtypes, the same targets the teacher
gives directly, read back in a packed batch's loss order, rebuilt when what made them changes."""
from __future__ import annotations

import numpy as np
import torch

from posttrain.seeds import derive_seed
from posttrain.engine import Frozen
from posttrain.loader import collate
from posttrain.losses import teacher_targets
from posttrain.model import PRESETS, build_model
from posttrain.recipe import load_config
from posttrain.targets import TargetCache

TINY = PRESETS["270m"].with_(vocab_size=500, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)


def examples(n: int = 7):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        L = 5 + i
        ids = torch.randint(1, 500, (L,), generator=g).tolist()
        out.append((ids, [False] * 3 + [True] * (L - 3)))  # a 3-token prompt, the rest is the reply
    return out


def test_cache_holds_the_teachers_targets_in_loss_order(tmp_path):
    cfg = load_config(["recipe=smoke", "distill.num_samples=16", "data.micro_batch_size=3"])
    teacher = build_model(TINY, seed=1).eval()
    ex = examples()
    cache = TargetCache.build(tmp_path, Frozen(teacher, cfg), ex, cfg, pad_id=0)
    ids_file = np.load(tmp_path / "shard_0_0.ids.npy")
    assert ids_file.dtype == np.int32 and np.load(tmp_path / "shard_0_0.probs.npy").dtype == np.float16
    assert ids_file.shape[1] == 16

    batch = collate(ex, [[4, 0], [6, 2, 1]], 40, pad_id=0)  # packed rows, examples out of order
    got_ids, got_probs = cache.batch(batch)
    want_ids, want_probs = [], []
    for i in (4, 0, 6, 2, 1):
        one = collate(ex, [[i]], len(ex[i][0]), pad_id=0)
        with torch.no_grad():
            h = teacher.hidden_states(one.ids)[one.loss_mask]
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "distill/cached_targets", i))
        a, b = teacher_targets(h, teacher.embed_tokens.weight, k=16, method="sample", generator=g)
        want_ids.append(a)
        want_probs.append(b)
    assert torch.equal(got_ids, torch.cat(want_ids))
    torch.testing.assert_close(got_probs, torch.cat(want_probs).float(), rtol=1e-3, atol=1e-7)


def test_cache_is_reused_only_when_it_was_made_the_same_way(tmp_path):
    cfg = load_config(["recipe=smoke", "distill.num_samples=8"])
    teacher = Frozen(build_model(TINY, seed=1), cfg)
    ex = examples()
    TargetCache.build(tmp_path, teacher, ex, cfg, pad_id=0)
    stamp = (tmp_path / "shard_0_0.ids.npy").stat().st_mtime_ns
    TargetCache.build(tmp_path, teacher, ex, cfg, pad_id=0)
    assert (tmp_path / "shard_0_0.ids.npy").stat().st_mtime_ns == stamp  # reused
    hotter = load_config(["recipe=smoke", "distill.num_samples=8", "distill.temperature=2.0"])
    TargetCache.build(tmp_path, teacher, ex, hotter, pad_id=0)
    assert (tmp_path / "shard_0_0.ids.npy").stat().st_mtime_ns != stamp  # rebuilt
