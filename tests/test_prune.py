"""A smaller student initialised from a larger model's layers (`model.student.layers`)."""
from __future__ import annotations

import pytest
import torch

from posttrain.model import GLOBAL, SLIDING, PRESETS, build_model, prune_layers

TINY = PRESETS["270m"].with_(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=12, num_heads=2,
                             num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)


def test_pruned_model_runs_the_kept_blocks_of_the_source():
    big = build_model(TINY, seed=0).eval()
    keep = [0, 3, 5, 8, 11]  # 5 and 11 are global layers of the Gemma 3 pattern
    small = prune_layers(big, keep).eval()
    assert small.config.num_layers == 5
    assert small.config.layer_types == (SLIDING, SLIDING, GLOBAL, SLIDING, GLOBAL)
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        x = big.embed(ids)
        for i in keep:  # the reference: the source model's own blocks, in order
            x = big.layers[i](x, positions, None)
        want = big.norm(x)
        got = small.hidden_states(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert small.embed_tokens.weight.data_ptr() != 0 and torch.equal(small.embed_tokens.weight, big.embed_tokens.weight)


@pytest.mark.parametrize("keep", [[], [3, 1], [0, 0], [0, 12], [-1, 2]])
def test_bad_layer_lists_are_refused(keep):
    with pytest.raises(ValueError, match="distinct, ascending and within 0..11"):
        prune_layers(build_model(TINY, device="meta"), keep)
