"""The vision path against transformers (float32, tiny random configs, our own loader).

SigLIP tower vs SiglipVisionModel, the projector vs Gemma3MultiModalProjector (re-randomised:
transformers zero-initialises it, so a random model's image features are all zero), the attention
masks with image blocks vs transformers' own mask builder, and end-to-end logits of
Gemma3ForConditionalGeneration: one image, two images in one turn, Pan & Scan crops, a padded batch,
and a sliding window shorter than an image.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import posttrain
from posttrain import model as model_mod
from posttrain.model import GemmaConfig, attention_mask, build_model
from posttrain.vision import Projector, VisionConfig, VisionTower, image_blocks, param_count

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig, SiglipVisionModel,
)
from transformers.models.gemma3 import modeling_gemma3 as hf_gemma3  # noqa: E402

IMG, BOI, EOI = 127, 125, 126  # token ids of the tiny models (image token inside the vocab, as in the 4B)


def tiny_vision(**kw) -> SiglipVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                patch_size=7, vision_use_head=False, attn_implementation="eager")
    return SiglipVisionConfig(**{**base, **kw})


def tiny_multimodal(sliding_window=8, mm_tokens=4, layers=7, **vision) -> Gemma3Config:
    text = Gemma3TextConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=sliding_window, rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=tiny_vision(**vision).to_dict(),
                       mm_tokens_per_image=mm_tokens, image_token_index=IMG, boi_token_index=BOI,
                       eoi_token_index=EOI)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


def randomise(module, seed=0):
    """Every parameter random: transformers zero-initialises RMSNorm weights and the projector."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if p.ndim == 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("layer_norm1.weight") else 0.0))
    return module.eval()


def hf_multimodal(tmp_path, **kw):
    hf = randomise(Gemma3ForConditionalGeneration(tiny_multimodal(**kw)))
    hf.save_pretrained(tmp_path)
    return hf


def pixels(n, size=28, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def sequence(parts, mm_tokens=4):
    """ids from parts: ints are text tokens, "img" an image block boi + mm_tokens soft tokens + eoi."""
    ids = []
    for p in parts:
        ids += [BOI] + [IMG] * mm_tokens + [EOI] if p == "img" else [p]
    return ids


def logits_diff(ours, hf, ids, pix, attention_mask=None, compare=None):
    tt = (ids == IMG).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix, token_type_ids=tt, attention_mask=attention_mask).logits
        segments = None if attention_mask is None else attention_mask.long()
        got = ours(ids, None, segments, pixel_values=pix, token_type_ids=tt)
    keep = compare if compare is not None else torch.ones_like(ids, dtype=torch.bool)
    return (got - ref)[keep].abs().max().item()


# ----------------------------------------------------------------------------- tower and projector

def test_tower_matches_siglip():
    hf = randomise(SiglipVisionModel(tiny_vision()))
    ours = VisionTower(VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28,
                                    patch_size=7, mm_tokens_per_image=4))
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = pixels(3)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == (3, 16, 32)
    assert (got - ref).abs().max().item() <= 1e-5


def test_so400m_parameter_count():
    counts = param_count(VisionConfig(), text_hidden=2560)
    assert counts["tower"] == 416_866_032  # the Gemma 3 report's "417M" vision encoder
    assert counts["projector"] == 1152 * 2560 + 1152
    full = posttrain.param_counts(GemmaConfig(vision=VisionConfig()))
    assert full["vision"] == counts["tower"] + 1152 * 640 + 1152


def test_projector_matches_transformers():
    cfg = tiny_multimodal(mm_tokens=4)
    hf = randomise(hf_gemma3.Gemma3MultiModalProjector(cfg))
    assert hf.mm_input_projection_weight.abs().max() > 0  # the test compares numbers, not zeros
    ours = Projector(VisionConfig(hidden_size=32, image_size=28, patch_size=7, num_heads=4, mm_tokens_per_image=4),
                     text_hidden=48)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(x) - hf(x)).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------- masks

def hf_masks(cfg, tt):
    B, T = tt.shape
    out = hf_gemma3.create_masks_for_vision_model(
        config=cfg.text_config, inputs_embeds=torch.zeros(B, T, cfg.text_config.hidden_size), attention_mask=None,
        cache=None, position_ids=torch.arange(T).expand(B, T),
        block_sequence_ids=hf_gemma3.get_block_sequence_ids_for_mask(tt))
    return {k: (m == 0) if m.dtype != torch.bool else m for k, m in out.items()}


@pytest.mark.parametrize("layout", [
    ["img", 5, 6, "img", "img", 7],  # two adjacent image blocks (wrapped), then text
    ["img", 9],  # an image at position 0
    [4, 5, "img", 6, 7, 8, 9, 10, 11, 12],  # text after an image, past the window
])
@pytest.mark.parametrize("window", [3, 8])  # 3: shorter than an image block (4 soft tokens)
def test_masks_match_transformers(layout, window):
    ids = torch.tensor([sequence(layout)])
    if layout[0] == "img":
        ids = ids[:, 1:]  # drop the leading boi: the image's first soft token sits at position 0
    tt = (ids == IMG).long()
    ref = hf_masks(tiny_multimodal(sliding_window=window), tt)
    T = ids.shape[1]
    index = torch.arange(T)
    blocks = image_blocks(tt)
    ours_global = attention_mask(index, index, None, None, None, blocks, blocks)[:, 0]
    ours_sliding = attention_mask(index, index, window, None, None, blocks, blocks)[:, 0]
    assert torch.equal(ours_global, ref["full_attention"][:, 0])
    assert torch.equal(ours_sliding, ref["sliding_attention"][:, 0])
    assert bool(ours_global[0][tt[0].bool()][:, tt[0].bool()].any())  # images see themselves both ways


def test_image_blocks():
    tt = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 1, 1]])
    assert image_blocks(tt).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1], [0, 0, -1, -1, -1, -1, 1, 1]]


# ----------------------------------------------------------------------------- end to end

def test_one_image(tmp_path):
    hf = hf_multimodal(tmp_path)
    ours = posttrain.load_model(tmp_path)
    assert ours.is_multimodal
    ids = torch.tensor([sequence([2, 10, 11, "img", 12, 13, 14, 15])])
    assert logits_diff(ours, hf, ids, pixels(1)) <= 1e-4


def test_two_images_in_one_turn_and_crops(tmp_path):
    """Two images back to back in a turn; then an image with three Pan & Scan crops (four blocks)."""
    hf = hf_multimodal(tmp_path)
    ours = posttrain.load_model(tmp_path)
    two = torch.tensor([sequence([2, 10, "img", "img", 12, 13])])
    assert logits_diff(ours, hf, two, pixels(2)) <= 1e-4
    crops = torch.tensor([sequence([2, 10, "img", 20, 21, "img", 22, "img", 22, "img", 14])])
    assert logits_diff(ours, hf, crops, pixels(4, seed=4)) <= 1e-4


def test_padded_batch(tmp_path):
    hf = hf_multimodal(tmp_path)
    ours = posttrain.load_model(tmp_path)
    a = sequence([2, 10, "img", 12, 13, 14, 15, 16])
    b = sequence([2, "img", 30, 31])
    width = len(a)
    ids = torch.tensor([a, b + [0] * (width - len(b))])
    mask = torch.tensor([[1] * width, [1] * len(b) + [0] * (width - len(b))])
    assert logits_diff(ours, hf, ids, pixels(2), attention_mask=mask, compare=mask.bool()) <= 1e-4


def test_sliding_window_shorter_than_an_image(tmp_path):
    """Window 3 < 16 soft tokens per image: sliding layers cut an image's past, never its future."""
    hf = hf_multimodal(tmp_path, sliding_window=3, mm_tokens=16)
    ours = posttrain.load_model(tmp_path)
    ids = torch.tensor([sequence([2, 10, "img", 12, 13, "img", 14], mm_tokens=16)])
    assert logits_diff(ours, hf, ids, pixels(2)) <= 1e-4


def test_long_sequence_query_blocks_keep_images_whole(tmp_path, monkeypatch):
    """Attention in query blocks (long sequences) must still let an image see its own later tokens."""
    hf = hf_multimodal(tmp_path, sliding_window=5, mm_tokens=16)
    ours = posttrain.load_model(tmp_path)
    ids = torch.tensor([sequence([2] + list(range(10, 20)) + ["img", 12, 13, "img"] + list(range(30, 40)),
                                 mm_tokens=16)])
    monkeypatch.setattr(model_mod, "ATTENTION_QUERY_BLOCK", 8)  # blocks split every image
    assert logits_diff(ours, hf, ids, pixels(2)) <= 1e-4


def test_text_only_prompt_on_a_multimodal_model(tmp_path):
    hf = hf_multimodal(tmp_path)
    ours = posttrain.load_model(tmp_path)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_image_count_mismatch_is_an_error(tmp_path):
    hf_multimodal(tmp_path)
    ours = posttrain.load_model(tmp_path)
    ids = torch.tensor([sequence([2, "img", 5])])
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids, pixel_values=pixels(2))


def test_text_only_model_refuses_pixels():
    model = build_model(GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, head_dim=8,
                                    num_heads=2, query_pre_attn_scalar=8))
    assert not hasattr(model, "vision_tower")
    with pytest.raises(ValueError, match="text-only"):
        model(torch.tensor([[1, 2]]), pixel_values=pixels(1))


# ----------------------------------------------------------------------------- checkpoints

def _rename(state, old, new):
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["saved", "hub", "memory_4x", "memory_5x"])
def test_every_layout_loads_strictly(tmp_path, layout):
    hf = hf_multimodal(tmp_path)
    state = load_file(tmp_path / "model.safetensors")  # transformers 5 save_pretrained layout
    assert any(k.startswith("vision_tower.") and ".vision_model." not in k for k in state)
    if layout == "hub":
        state = _rename(state, "vision_tower.", "vision_tower.vision_model.")
    elif layout == "memory_4x":
        state = _rename(_rename(_rename(state, "vision_tower.", "model.vision_tower.vision_model."),
                                "multi_modal_projector.", "model.multi_modal_projector."),
                        "language_model.model.", "model.language_model.")
    elif layout == "memory_5x":
        state = _rename(_rename(_rename(state, "vision_tower.", "model.vision_tower."),
                                "multi_modal_projector.", "model.multi_modal_projector."),
                        "language_model.model.", "model.language_model.")
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = posttrain.load_model(tmp_path)
    ids = torch.tensor([sequence([2, 10, "img", 12])])
    assert logits_diff(ours, hf, ids, pixels(1)) <= 1e-4


def test_export_loads_in_transformers(tmp_path):
    hf = hf_multimodal(tmp_path / "src")
    ours = posttrain.load_model(tmp_path / "src")
    posttrain.save_pretrained(ours, None, tmp_path / "out")
    keys = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)  # the hub layout
    back, info = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                                attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([sequence([2, 10, "img", 12, 13])])
    assert logits_diff(ours, back.eval(), ids, pixels(1)) <= 1e-5
    reloaded = posttrain.load_model(tmp_path / "out")
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert logits_diff(reloaded, hf, ids, pixels(1)) <= 1e-4


def test_add_vision_keeps_the_text_model_and_seeds_the_tower():
    from posttrain.config import ModelSpec
    from posttrain.model import add_vision

    text = build_model(GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, head_dim=8,
                                   num_heads=2, query_pre_attn_scalar=8), seed=0)
    vision = VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=16, patch_size=4,
                          mm_tokens_per_image=4)
    a, b = add_vision(text, vision, seed=1), add_vision(text, vision, seed=1)
    assert a.embed_tokens.weight is text.embed_tokens.weight  # the same tensors, not copies
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.vision_tower.post_layernorm.weight, torch.ones(8))
    assert a(torch.tensor([[2, 5, 3, 4]])).shape == (1, 4, 64)  # text-only input still works
    with pytest.raises(ValueError, match="already"):
        add_vision(a, vision, seed=1)
    with pytest.raises(ValueError, match="unknown fields"):
        ModelSpec(source="gemma3-270m", vision={"hidden": 8})
    with pytest.raises(ValueError, match="divisible"):
        ModelSpec(source="gemma3-270m", vision={"hidden_size": 9, "num_heads": 2})
