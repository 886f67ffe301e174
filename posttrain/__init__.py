"""posttrain: post-train Gemma 3 the way the Gemma 3 report does.

Public API:
    load_model(source, dtype=..., device=...)   HF directory, .gguf file, or "gemma3-270m"
    read_config(source)                          architecture only, no weights
    save_pretrained(model, tokenizer, out_dir)   HF directory transformers loads
    load_tokenizer(source)                       same sources
    GemmaConfig, PRESETS, Gemma3, build_model, param_counts
"""

from .checkpoint import load_model, read_config, save_pretrained
from .errors import UserError
from .model import PRESETS, Gemma3, GemmaConfig, build_model, param_counts
from .tokenizer import load_tokenizer

__all__ = [
    "load_model", "read_config", "save_pretrained", "load_tokenizer", "UserError",
    "GemmaConfig", "PRESETS", "Gemma3", "build_model", "param_counts",
]
