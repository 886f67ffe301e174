"""HF `config.json` <-> GemmaConfig.

Accepts Gemma3ForCausalLM configs (`model_type: gemma3_text`) and Gemma3ForConditionalGeneration
configs (`model_type: gemma3`, text fields under `text_config`), in both field forms:
  old: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern
  new: rope_parameters per layer type, layer_types
Omitted fields take the values of HF's Gemma3TextConfig class defaults (the 4B/12B hub configs
rely on them), reproduced in HF_TEXT_DEFAULTS below, not invented.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UserError
from .model import GLOBAL, SLIDING, GemmaConfig
from .vision import VisionConfig

# transformers' Gemma3TextConfig defaults (the gemma-3-4b shape with a 4096 window).
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "use_bidirectional_attention": False,
}

GEMMA3_TYPES = ("gemma3_text", "gemma3")

# transformers' SiglipVisionConfig class defaults, for fields a vision_config leaves out.
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "vision_use_head": True,
}
# Gemma3Config's own defaults (the released models' token ids and 256 tokens per image).
HF_MULTIMODAL_DEFAULTS: dict[str, Any] = {
    "mm_tokens_per_image": 256, "image_token_index": 262_144, "boi_token_index": 255_999, "eoi_token_index": 256_000,
}


def _vision_config(raw: dict, where: str) -> VisionConfig | None:
    """The tower and projector of a Gemma3ForConditionalGeneration config; None for a text-only one."""
    if raw.get("model_type") != "gemma3":
        return None
    given = raw.get("vision_config")
    if given is None:
        return None
    if not isinstance(given, dict):
        raise UserError(f"{where}: 'vision_config' must be an object")
    vision = {**HF_VISION_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UserError(f"{where}: vision_config.model_type is '{vision['model_type']}'; Gemma 3 uses "
                        "'siglip_vision_model'")
    if vision["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{where}: vision_config.hidden_act={vision['hidden_act']!r} is not supported; "
                        "SigLIP in Gemma 3 uses 'gelu_pytorch_tanh'")
    # vision_use_head: Gemma 3 reads the tower's last hidden states; a pooling head, where a file has
    # one, is never used (checkpoint.py skips its tensors).
    top = {**HF_MULTIMODAL_DEFAULTS, **{k: raw[k] for k in HF_MULTIMODAL_DEFAULTS if raw.get(k) is not None}}
    try:
        return VisionConfig(
            hidden_size=int(vision["hidden_size"]), intermediate_size=int(vision["intermediate_size"]),
            num_layers=int(vision["num_hidden_layers"]), num_heads=int(vision["num_attention_heads"]),
            num_channels=int(vision["num_channels"]), image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]), layer_norm_eps=float(vision["layer_norm_eps"]),
            mm_tokens_per_image=int(top["mm_tokens_per_image"]), image_token_id=int(top["image_token_index"]),
            boi_token_id=int(top["boi_token_index"]), eoi_token_id=int(top["eoi_token_index"]),
        )
    except ValueError as e:
        raise UserError(f"{where}: {e}") from e


def _text_config(raw: dict, where: str) -> dict:
    model_type = raw.get("model_type")
    if model_type not in GEMMA3_TYPES:
        arch = raw.get("architectures") or model_type
        raise UserError(
            f"{where}: model_type '{model_type}' ({arch}) is not Gemma 3; posttrain loads Gemma 3 checkpoints "
            "(model_type 'gemma3_text' or 'gemma3')"
        )
    if model_type == "gemma3":
        text = raw.get("text_config") or {}
        if not isinstance(text, dict):
            raise UserError(f"{where}: 'text_config' must be an object")
        if text.get("model_type", "gemma3_text") != "gemma3_text":
            raise UserError(f"{where}: text_config.model_type is '{text['model_type']}', expected 'gemma3_text'")
        return text
    return raw


def _rope(text: dict, where: str) -> tuple[float, float, float]:
    """(local base, global base, global linear scaling factor) from either field form."""
    params = text.get("rope_parameters")
    if params is not None and set(params) <= {GLOBAL, SLIDING}:
        glob = dict(params.get(GLOBAL) or {})
        local = dict(params.get(SLIDING) or {})
    else:  # old form, or a single rope_parameters dict for the global layers
        glob = dict(params or text.get("rope_scaling") or {})
        local = {}
    glob.setdefault("rope_theta", text.get("rope_theta", HF_TEXT_DEFAULTS["rope_theta"]))
    local.setdefault("rope_theta", text.get("rope_local_base_freq", HF_TEXT_DEFAULTS["rope_local_base_freq"]))
    kind = glob.get("rope_type", glob.get("type", "default"))
    if kind == "default":
        factor = 1.0
    elif kind == "linear":
        factor = float(glob["factor"])
    else:
        raise UserError(f"{where}: RoPE type '{kind}' on global layers is not supported (Gemma 3 uses 'linear')")
    local_kind = local.get("rope_type", local.get("type", "default"))
    if local_kind != "default":
        raise UserError(f"{where}: RoPE type '{local_kind}' on sliding layers is not supported (Gemma 3 uses none)")
    return float(local["rope_theta"]), float(glob["rope_theta"]), factor


def config_from_hf(raw: dict, where: str = "config.json") -> GemmaConfig:
    """A GemmaConfig from a parsed HF config.json; unsupported features fail, naming the field."""
    given = _text_config(raw, where)
    text = {**HF_TEXT_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    unsupported = {
        "hidden_activation": ("gelu_pytorch_tanh", "gelu_tanh"),
        "final_logit_softcapping": (None,),
        "attn_logit_softcapping": (None,),
        "attention_bias": (False,),
        "use_bidirectional_attention": (False, None),
    }
    for key, allowed in unsupported.items():
        if text.get(key) not in allowed:
            raise UserError(f"{where}: {key}={text[key]!r} is not supported; Gemma 3 uses {allowed[0]!r}")
    tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    if tied is False:
        raise UserError(f"{where}: tie_word_embeddings=false is not supported; Gemma 3 ties the output head")
    layers = int(text["num_hidden_layers"])
    layer_types = text.get("layer_types")
    if not layer_types:
        pattern = int(text.get("sliding_window_pattern") or 6)
        layer_types = [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)]
    local_base, global_base, scaling = _rope(text, where)
    try:
        return GemmaConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_layers=layers,
            num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text["head_dim"]),
            query_pre_attn_scalar=float(text["query_pre_attn_scalar"]),
            sliding_window=int(text["sliding_window"]),
            max_position_embeddings=int(text["max_position_embeddings"]),
            rope_local_base=local_base,
            rope_global_base=global_base,
            rope_global_scaling=scaling,
            rms_norm_eps=float(text["rms_norm_eps"]),
            layer_types=tuple(layer_types),
            vision=_vision_config(raw, where),
        )
    except ValueError as e:
        raise UserError(f"{where}: {e}") from e


def config_to_hf(cfg: GemmaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json: Gemma3ForCausalLM, or Gemma3ForConditionalGeneration for a model with vision.
    Writes the new field form and the old one beside it, so both current and older transformers
    releases read the same architecture."""
    text = _text_config_to_hf(cfg, dtype)
    if cfg.vision is None:
        return text
    v = cfg.vision
    text.pop("architectures")
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "num_channels": v.num_channels, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": v.layer_norm_eps,
            "attention_dropout": 0.0, "vision_use_head": False,
        },
        "mm_tokens_per_image": v.mm_tokens_per_image,
        "image_token_index": v.image_token_id,
        "boi_token_index": v.boi_token_id,
        "eoi_token_index": v.eoi_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": text["torch_dtype"],
        "dtype": text["dtype"],
    }


def _text_config_to_hf(cfg: GemmaConfig, dtype: torch.dtype) -> dict:
    rope_global: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_global_base}
    if cfg.rope_global_scaling != 1.0:
        rope_global = {"rope_type": "linear", "factor": cfg.rope_global_scaling, "rope_theta": cfg.rope_global_base}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        # HF types this field as int; 168 and 256 are integral for every released model.
        "query_pre_attn_scalar": int(q) if (q := cfg.query_pre_attn_scalar) == int(q) else q,
        "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": list(cfg.layer_types),
        "rope_parameters": {
            GLOBAL: rope_global,
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_base},
        },
        # old form, read by transformers < 5
        "rope_theta": cfg.rope_global_base,
        "rope_local_base_freq": cfg.rope_local_base,
        "rope_scaling": None if cfg.rope_global_scaling == 1.0 else {
            "rope_type": "linear", "factor": cfg.rope_global_scaling},
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
