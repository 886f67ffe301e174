"""Writing a Gemma 3 text model as a GGUF file (llama.cpp's format) with the `gguf` package.

    sizes = write_gguf(model, "model-q4_0.gguf")            # Q4_0 linear weights, F16 embedding, F32 norms

The seven linear weights of every block are Q4_0 (posttrain.quant.q4_0 gives their dequantised values
exactly); the tied embedding/head is F16 as in Google's QAT Q4_0 files (embedding="q4_0" quantises it
too, "f32" keeps it whole); norm weights are F32 with llama.cpp's +1 of x * (1 + w) added. The
tokenizer is the Gemma 3 one, copied from the embedded GGUF's metadata, so llama.cpp, Ollama, LM Studio
and transformers (`from_pretrained(dir, gguf_file=...)`) read the file as they read Google's. Our own
loader (`posttrain.load_model(path)`) reads it back. A multimodal model's tower is not written: like
Google's files, the GGUF holds the text model (llama.cpp reads the tower from a separate mmproj file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .gguf_io import _BLOCK_NAMES, _GLOBAL_NAMES, open_gguf
from .model import Gemma3
from .quant import effective_state_dict, is_linear, q4_0, quantize_linear_

EMBEDDING_TYPES = ("f16", "f32", "q4_0")


def _gguf_names() -> dict[str, str]:
    """our parameter name pattern -> the GGUF name ({i} is the layer)."""
    out = {ours: theirs for theirs, ours in _GLOBAL_NAMES.items()}
    out |= {f"layers.{{i}}.{ours}.weight": f"blk.{{i}}.{theirs}.weight" for theirs, ours in _BLOCK_NAMES.items()}
    return out


def _copy_tokenizer(writer, source: Path) -> None:
    import gguf

    reader = open_gguf(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def write_gguf(model: Gemma3, path: str | Path, *, embedding: str = "f16", tokenizer_from: Path | None = None,
               name: str = "gemma-3 (posttrain)") -> dict:
    """Write `model` (its text part) to `path` with Q4_0 linear weights; returns the file's size and
    bits per weight (over the linear weights, and over all weights)."""
    import gguf

    from .embedded import embedded_gguf_path

    if embedding not in EMBEDDING_TYPES:
        raise UserError(f"export embedding type {embedding!r} is not one of {', '.join(EMBEDDING_TYPES)}")
    c = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_sliding_window(c.sliding_window)
    writer.add_rope_freq_base(c.rope_global_base)
    if c.rope_global_scaling != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_global_scaling)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_tokenizer(writer, tokenizer_from or embedded_gguf_path())

    names = _gguf_names()
    state = {k: v for k, v in effective_state_dict(model).items()  # QAT's quantized values, if on
             if not k.startswith(("vision_tower.", "multi_modal_projector."))}
    linear_params = linear_bytes = total_params = 0
    for key, value in state.items():
        pattern = key
        parts = key.split(".")
        if parts[0] == "layers":
            pattern = ".".join(["layers", "{i}", *parts[2:]])
        if pattern not in names:
            raise UserError(f"{key}: no GGUF name for this tensor; fix: export it with posttrain.save_pretrained")
        gname = names[pattern].format(i=parts[1] if parts[0] == "layers" else "")
        w = value.detach().float().cpu().numpy()
        total_params += w.size
        linear = is_linear(key)
        if linear or (key == "embed_tokens.weight" and embedding == "q4_0"):
            packed = gguf.quants.quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType.Q4_0)
            writer.add_tensor(gname, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            if linear:
                linear_params, linear_bytes = linear_params + w.size, linear_bytes + packed.nbytes
        elif key == "embed_tokens.weight":
            writer.add_tensor(gname, w.astype(np.float16 if embedding == "f16" else np.float32))
        else:  # norms: llama.cpp stores 1 + w
            writer.add_tensor(gname, (w + 1.0).astype(np.float32) if key.endswith("norm.weight") else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = path.stat().st_size
    return {"path": str(path), "bytes": size, "linear_bits_per_weight": 8 * linear_bytes / max(linear_params, 1),
            "bits_per_weight": 8 * size / max(total_params, 1)}


def q4_0_reference(model: Gemma3, embedding: str = "f16") -> Gemma3:
    """A copy of `model` holding exactly the values write_gguf stores (dequantised): what a reader of
    the file computes with."""
    import copy

    out = quantize_linear_(copy.deepcopy(model).float(), "q4_0")
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name == "embed_tokens.weight":
                p.copy_(q4_0(p) if embedding == "q4_0" else p.half().float() if embedding == "f16" else p)
            elif name.endswith("norm.weight"):
                p.copy_((p + 1.0) - 1.0)  # the +1 round trip in float32, as the reader undoes it
    return out


__all__ = ["write_gguf", "q4_0_reference", "EMBEDDING_TYPES"]
