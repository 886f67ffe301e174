"""Our decoder, loaded by our own loader, against transformers' Gemma 3 (eager, float32).

transformers writes the checkpoint with its own save_pretrained; `posttrain.load_model`
reads it back. Tiny random configs cover: sequences longer than the sliding window, several
kv heads, query_pre_attn_scalar != head_dim, linear RoPE scaling on global layers, layer
counts that are not a multiple of 6, the multimodal layouts, the old config field form,
sharded safetensors, and our save_pretrained going the other way.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import posttrain
from posttrain import model as model_mod

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM, Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig,
    SiglipVisionConfig,
)

TOL = 1e-4

TEXT_CASES = {
    # 7 layers: layer 5 global, the rest sliding; window 8 << sequence 40.
    "gqa_scaled": dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       query_pre_attn_scalar=24, sliding_window=8, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # 13 layers: two global layers, MQA, no scaling, window 5.
    "mqa_13_layers": dict(num_hidden_layers=13, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          query_pre_attn_scalar=32, sliding_window=5),
    # 4 heads / 4 kv heads (plain MHA), head_dim * heads != hidden, custom layer_types.
    "mha_custom_types": dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                             query_pre_attn_scalar=11, sliding_window=6,
                             layer_types=["full_attention", "sliding_attention", "full_attention"]),
}


def hf_text_config(**overrides) -> Gemma3TextConfig:
    base = dict(vocab_size=128, hidden_size=48, intermediate_size=80, attn_implementation="eager")
    return Gemma3TextConfig(**{**base, **overrides})


def random_hf_model(cls, config, seed=0):
    torch.manual_seed(seed)
    m = cls(config).eval()
    with torch.no_grad():  # HF inits norms at zero; randomise them so the (1 + w) convention is tested
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    return m


def ids_batch(vocab=128, batch=2, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def max_diff(ours, ids, reference_logits) -> float:
    with torch.no_grad():
        return (ours(ids) - reference_logits).abs().max().item()


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_causal_lm_parity(tmp_path, case):
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES[case]))
    hf.save_pretrained(tmp_path)
    ours = posttrain.load_model(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_diff(ours, ids, ref) <= TOL


def test_parity_survives_query_blocking(tmp_path, monkeypatch):
    """Long sequences run attention in query blocks (no T x T mask); results must not change."""
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES["gqa_scaled"]))
    hf.save_pretrained(tmp_path)
    ours = posttrain.load_model(tmp_path)
    ids = ids_batch(length=70)
    with torch.no_grad():
        ref = hf(ids).logits
    monkeypatch.setattr(model_mod, "ATTENTION_QUERY_BLOCK", 16)
    assert max_diff(ours, ids, ref) <= TOL


def _multimodal(tmp_path):
    text = hf_text_config(**TEXT_CASES["gqa_scaled"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    hf = random_hf_model(Gemma3ForConditionalGeneration, cfg)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_conditional_generation_layouts(tmp_path, prefix):
    hf = _multimodal(tmp_path)
    # transformers writes one of the two multimodal layouts; rewrite keys into the other so both are read.
    state = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for key, t in state.items():
        for old in ("language_model.model.", "model.language_model."):
            if key.startswith(old):
                key = prefix + key[len(old):]
        renamed[key] = t
    assert any(k.startswith(prefix) for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = posttrain.load_model(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert max_diff(ours, ids, ref) <= TOL
    assert ours.is_multimodal  # the tower and projector are loaded too (tests/test_vision_parity.py)


def test_old_config_form_and_hf_defaults(tmp_path):
    """An old-style config.json relying on HF class defaults reads as the same architecture."""
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES["gqa_scaled"]))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters", "max_position_embeddings", "rms_norm_eps"):
        cfg.pop(key, None)
    cfg.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6,
               rope_scaling={"type": "linear", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    read = posttrain.read_config(tmp_path)
    assert read.rope_global_scaling == 8.0 and read.rope_local_base == 10_000.0
    assert read.max_position_embeddings == 131_072  # HF's class default, not ours
    assert [read.is_global(i) for i in range(7)] == [False] * 5 + [True, False]
    ours = posttrain.load_model(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_diff(ours, ids, ref) <= TOL


def test_hub_4b_style_multimodal_config_uses_class_defaults(tmp_path):
    """The gemma-3-4b hub config omits head counts, vocab and head_dim under text_config."""
    raw = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert posttrain.read_config(tmp_path) == posttrain.PRESETS["4b"]


def test_sharded_checkpoint(tmp_path):
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES["mqa_13_layers"]))
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = posttrain.load_model(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        ref = hf(ids).logits
    assert max_diff(ours, ids, ref) <= TOL


@pytest.mark.parametrize("case", ["gqa_scaled", "mha_custom_types"])
def test_save_pretrained_round_trip(tmp_path, case):
    """Our export loads in transformers with the same logits, sharded or not."""
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES[case]))
    hf.save_pretrained(tmp_path / "src")
    ours = posttrain.load_model(tmp_path / "src")
    posttrain.save_pretrained(ours, None, tmp_path / "out", max_shard_bytes=40_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    ids = ids_batch()
    with torch.no_grad():
        ref = back(ids).logits
    assert max_diff(ours, ids, ref) <= TOL
    assert posttrain.read_config(tmp_path / "out") == ours.config


def test_packed_segments_match_separate_sequences(tmp_path):
    """Two documents packed in one row with restarted positions equal two separate rows."""
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES["gqa_scaled"]))
    hf.save_pretrained(tmp_path)
    ours = posttrain.load_model(tmp_path)
    a, b = ids_batch(batch=1, length=23, seed=3), ids_batch(batch=1, length=17, seed=4)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(23), torch.arange(17)])[None]
    segments = torch.cat([torch.zeros(23, dtype=torch.long), torch.ones(17, dtype=torch.long)])[None]
    with torch.no_grad():
        together = ours(packed, positions=positions, segments=segments)
        apart = torch.cat([ours(a), ours(b)], dim=1)
    assert (together - apart).abs().max().item() <= 1e-5


def test_hidden_states_then_logits_equals_forward(tmp_path):
    hf = random_hf_model(Gemma3ForCausalLM, hf_text_config(**TEXT_CASES["gqa_scaled"]))
    hf.save_pretrained(tmp_path)
    ours = posttrain.load_model(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        h = ours.hidden_states(ids)
        assert h.shape == (2, 40, 48)
        assert torch.equal(ours.logits(h), ours(ids))


def test_activation_checkpointing_gives_same_gradients():
    cfg = posttrain.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2,
                                num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    m = posttrain.build_model(cfg, seed=0).train()
    ids = ids_batch(vocab=64, length=12)
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.activation_checkpointing = flag
        m(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
