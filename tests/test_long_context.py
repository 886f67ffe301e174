"""Long context: our decoder against transformers' Gemma 3 at positions up to 131,071.

RoPE at long positions is where rounding shows: an inverse frequency that is one ulp off moves the
angle by position x ulp, so short sequences at position 0 (test_model_parity) cannot see it. Here a
tiny random model with the 4B-style RoPE (global layers base 1e6 with linear scaling 8, local layers
base 1e4, head_dim 256 so there are 128 frequencies per table) is run at position offsets up to the
128K limit, ours loaded by our own loader from transformers' save_pretrained. The real 270M at
positions up to 32,767 is in test_real_model.py.
"""

import pytest
import torch

import posttrain

transformers = pytest.importorskip("transformers")
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

T = 40  # tokens per row; the window (8) and one global layer (layer 5 of 7) are both inside it


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=7, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
        max_position_embeddings=131_072, attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("long_rope")
    hf.save_pretrained(path)
    return posttrain.load_model(path), hf


def test_loaded_rope_settings_are_the_4b_style(models):
    ours, _ = models
    assert (ours.config.rope_global_base, ours.config.rope_global_scaling) == (1_000_000.0, 8.0)
    assert ours.config.rope_local_base == 10_000.0


@pytest.mark.parametrize("offset", [0, 1_000, 32_000, 65_536, 131_072 - T])
def test_logits_equal_transformers_at_long_positions(models, offset):
    """Last case: the final position is 131,071, the last one a 128K model has."""
    ours, hf = models
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(offset))
    positions = torch.arange(offset, offset + T).expand(2, T)
    with torch.no_grad():
        ref = hf(ids, position_ids=positions).logits
        mine = ours(ids, positions=positions)
    diff = (mine - ref).abs().max().item()
    # float64-then-rounded frequencies gave 8e-5 at offset 32,000 on this kind of model; now exact
    # up to float32 summation order
    assert diff <= 1e-5, f"max |logit diff| {diff:.2e} at positions {offset}..{offset + T - 1}"


def test_packed_documents_restart_positions_at_long_offsets(models):
    """Two documents in one row: the second restarts at its own position, and sees only itself."""
    ours, hf = models
    a = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    start = 100_000
    pos = torch.cat([torch.arange(start, start + 24), torch.arange(start, start + 16)])[None]
    seg = torch.cat([torch.zeros(24, dtype=torch.long), torch.ones(16, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = ours(torch.cat([a, b], 1), positions=pos, segments=seg)
        ref_b = hf(b, position_ids=torch.arange(start, start + 16)[None]).logits
    assert (packed[:, 24:] - ref_b).abs().max().item() <= 1e-5
