"""Reading Gemma 3 GGUF files (llama.cpp format) with the `gguf` package.

Tensors are dequantised to float32 one at a time. llama.cpp stores Gemma norm weights with the
+1 of `x * (1 + w)` already added; we subtract it again so the model sees HF-convention weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UserError
from .model import GemmaConfig

# GGUF tensor names -> our parameter names (the HF names without the `model.` prefix).
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def open_gguf(path: Path):
    """A GGUFReader (memory-mapped); a truncated or foreign file is a UserError naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on bad files
        raise UserError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or corrupt: "
            "download or assemble it again"
        ) from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader, path: Path) -> GemmaConfig:
    """GemmaConfig from GGUF metadata (llama.cpp's `gemma3.*` keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise UserError(f"{path}: GGUF architecture is '{arch}', not 'gemma3'; posttrain loads Gemma 3 only")

    def need(key):
        value = _field(reader, f"gemma3.{key}")
        if value is None:
            raise UserError(f"{path}: GGUF metadata lacks 'gemma3.{key}'; the file was not written by llama.cpp")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    layers = int(need("block_count"))
    head_dim = int(need("attention.key_length"))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{path}: GGUF file has no token_embd.weight tensor")
    # GGUF lists dims fastest-first: token_embd is [hidden, vocab].
    vocab = int(embd.shape[-1])
    # GGUF does not store query_pre_attn_scalar. llama.cpp uses hidden / heads for the 27B
    # (62 layers, 5376 / 32 = 168) and head_dim otherwise; we follow it.
    qpas = hidden / heads if layers == 62 else head_dim
    scaling = 1.0
    if _field(reader, "gemma3.rope.scaling.type") == "linear":
        scaling = float(_field(reader, "gemma3.rope.scaling.factor", 1.0))
    try:
        return GemmaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
            num_layers=layers, num_heads=heads, num_kv_heads=int(need("attention.head_count_kv")),
            head_dim=head_dim, query_pre_attn_scalar=qpas, sliding_window=int(need("attention.sliding_window")),
            max_position_embeddings=int(need("context_length")),
            rope_global_base=float(_field(reader, "gemma3.rope.freq_base", 1_000_000.0)),
            rope_global_scaling=scaling,
            rms_norm_eps=float(_field(reader, "gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        )
    except ValueError as e:
        raise UserError(f"{path}: {e}") from e


def _our_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return name  # strict loading will report it as unexpected


def gguf_tensors(reader, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, float32 tensor) pairs, dequantised one at a time, norm offset undone."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise UserError(f"{path}: tensor '{t.name}' cannot be decoded ({e}); the file is corrupt") from e
        # numpy shape is slowest-first, i.e. already (out_features, in_features) like torch.
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # float32 tensors come straight from the read-only memory map
            array = array.copy()
        tensor = torch.from_numpy(array)
        name = _our_name(t.name)
        if name.endswith("norm.weight"):
            tensor = tensor - 1.0
        yield name, tensor
