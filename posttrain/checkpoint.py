"""Weights in and out: HF safetensors directories, GGUF files, and the embedded gemma3-270m.

    load_model(source)       source: an HF directory, a .gguf file, or "gemma3-270m"
    read_config(source)      the architecture only, no weights read
    save_pretrained(model, tokenizer, out_dir)   an HF directory transformers loads

Format differences stay here: the model only knows its own parameter names, which are the
HF text-model names without the `model.` prefix. Loading is strict: every model tensor must
be found with the right shape, and every tensor in the file must be used. A multimodal
checkpoint (Gemma3ForConditionalGeneration) loads with its vision tower and projector.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .embedded import EMBEDDED_NAME, cache_dir, embedded_gguf_path
from .errors import UserError
from .hf_config import config_from_hf, config_to_hf
from .model import Gemma3, GemmaConfig

log = logging.getLogger(__name__)

# Key prefixes of the text decoder in the layouts we accept (README, "Using the pieces"):
# Gemma3ForCausalLM, Gemma3ForConditionalGeneration as on the hub, and as current HF writes it.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# The vision tower and projector in the same layouts -> our names (model.VISION_PREFIXES). The hub
# files and transformers 4.x keep SigLIP's `vision_model.` level; transformers 5 drops it in memory
# and in what it saves. Longest prefixes first.
VISION_RENAMES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
# SigLIP's attention-pooling head, present when a config leaves vision_use_head at transformers'
# default (true): Gemma 3 never uses the pooled output, so its tensors are not loaded.
UNUSED_VISION_HEAD = ("vision_tower.vision_model.head.", "model.vision_tower.vision_model.head.",
                      "model.vision_tower.head.", "vision_tower.head.")
# What we write for a multimodal model: the hub layout, which transformers reads and llama.cpp's
# converter (gguf's tensor map) knows.
HUB_LAYOUT = (("vision_tower.", "vision_tower.vision_model."), ("multi_modal_projector.", "multi_modal_projector."),
              ("", "language_model.model."))
TIED_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
EMBEDDED_FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------- sources

def _resolve(source: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) with kind in {"hf", "gguf"}; the embedded name maps to its cached HF directory."""
    if str(source) == EMBEDDED_NAME:
        return "hf", embedded_hf_dir()
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"model source '{source}' does not exist; give an HF model directory (with config.json and "
            f"*.safetensors), a .gguf file, or '{EMBEDDED_NAME}' for the embedded Gemma 3 270M"
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json; an HF model directory needs config.json and *.safetensors")
        return "hf", path
    if path.suffix == ".gguf":
        return "gguf", path
    raise UserError(f"model source {path} is neither a directory nor a .gguf file")


def read_config(source: str | os.PathLike) -> GemmaConfig:
    """The architecture of a model source, reading only metadata (no weights)."""
    kind, path = _resolve(source)
    if kind == "hf":
        return config_from_hf(_read_json(path / "config.json"), where=str(path / "config.json"))
    from .gguf_io import gguf_config, open_gguf
    return gguf_config(open_gguf(path), path)


def load_model(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> Gemma3:
    """Load a Gemma 3 text decoder, strictly, in eval mode.

    The model is built on the meta device and the file's tensors are assigned into it, so
    weights exist once in memory (safetensors are memory-mapped; a dtype or device change
    converts one tensor at a time).
    """
    kind, path = _resolve(source)
    if kind == "hf":
        cfg = read_config(path)
        tensors = _hf_tensors(path)
    else:
        from .gguf_io import gguf_config, gguf_tensors, open_gguf
        reader = open_gguf(path)
        cfg = gguf_config(reader, path)
        tensors = gguf_tensors(reader, path)
    model = assign_weights(cfg, tensors, dtype=dtype, device=device, where=str(path))
    return model.eval()


def assign_weights(
    cfg: GemmaConfig, tensors: Iterator[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
    device: str | torch.device, where: str,
) -> Gemma3:
    """Build on meta and assign (name, tensor) pairs in our naming; strict about names and shapes."""
    with torch.device("meta"):
        model = Gemma3(cfg)
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{where}: tensor '{name}' has shape {tuple(tensor.shape)} but the config "
                f"(hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, head_dim {cfg.head_dim}, "
                f"vocab {cfg.vocab_size}) needs {tuple(expected[name].shape)}; the weights and config.json "
                "do not belong together"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    if unexpected:
        raise UserError(f"{where}: unexpected tensors not part of a Gemma 3 text decoder: {_names(unexpected)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{where}: missing tensors: {_names(missing)}; the checkpoint is incomplete")
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope()
    return model


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e


# ----------------------------------------------------------------------------- HF safetensors

def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no 'weight_map' object; re-save the checkpoint")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        if missing := [f.name for f in files if not f.exists()]:
            raise UserError(f"{index} lists shard files that are missing: {missing}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights (.bin/.pt checkpoints are not supported: convert them)")
    return files


def _text_name(key: str) -> str | None:
    """Our parameter name for a checkpoint key; None for tensors we skip on purpose (the tied head)."""
    if key in TIED_HEAD_KEYS or key.startswith(UNUSED_VISION_HEAD):
        return None
    for prefix, ours in VISION_RENAMES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key  # left as is: strict loading reports it as unexpected


def _hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")  # memory-mapped
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}); the file is truncated or corrupt") from e
        for key in keys:
            name = _text_name(key)
            if name is None:
                continue
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise UserError(f"{file}: tensor '{key}' cannot be read ({e}); the file is truncated or corrupt") from e
            yield name, tensor


# ----------------------------------------------------------------------------- embedded model

def embedded_hf_dir() -> Path:
    """The embedded Gemma 3 270M as an HF directory, converted once from its GGUF and cached.

    Dequantising the GGUF takes seconds; the cached float32 safetensors are memory-mapped on
    every later load. Built in a temporary directory and renamed, so an interrupted first run
    never leaves a half-written cache.
    """
    target = cache_dir() / f"gemma3-270m-hf-v{EMBEDDED_FORMAT_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    gguf_path = embedded_gguf_path()
    from .gguf_io import gguf_config, gguf_tensors, open_gguf
    from .tokenizer import load_tokenizer

    reader = open_gguf(gguf_path)
    model = assign_weights(
        gguf_config(reader, gguf_path), gguf_tensors(reader, gguf_path), dtype=torch.float32, device="cpu",
        where=str(gguf_path),
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, load_tokenizer(gguf_path), tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- export

def save_pretrained(
    model: Gemma3, tokenizer, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30, dedupe_within: str | os.PathLike | None = None,
) -> Path:
    """Write an HF directory (config.json, safetensors, tokenizer files, chat template).

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it as Gemma3ForCausalLM
    with the same logits; a model with vision is written in the hub's Gemma3ForConditionalGeneration
    layout (AutoModelForImageTextToText). Shards above `max_shard_bytes` with a
    model.safetensors.index.json.

    dedupe_within: a directory (the run's): the embedding goes to a shard of its own, and a shard
    whose bytes equal a .safetensors file already under that directory becomes a hard link to it
    (stages that keep the embedding frozen store it once; each directory stays complete on its own).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .quant import effective_state_dict

    state = {}
    for name, p in effective_state_dict(model).items():  # fake-quantized weights (QAT) as quantized
        t = p.detach().to("cpu")
        state[hf_key(name, model.config.vision is not None)] = (t.to(dtype) if dtype is not None else t).contiguous()
    weight_dtype = state[hf_key("embed_tokens.weight", model.config.vision is not None)].dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    embed = hf_key("embed_tokens.weight", model.config.vision is not None)
    if dedupe_within is not None and embed in state and len(state) > 1:
        shards = [{embed: state[embed]}, {}]
    for key, t in state.items():
        if len(shards) > 1 and key == embed and embed in shards[0]:
            continue
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(out / "model.safetensors", lambda p: save_file(shards[0], str(p), metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(out / fname, lambda p, s=shard: save_file(s, str(p), metadata=meta))
            if dedupe_within is not None:
                link_if_stored(out / fname, Path(dedupe_within))
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2)))
    hf = config_to_hf(model.config, dtype=weight_dtype)
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
    gen = {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    atomic_write(out / "generation_config.json", lambda p: p.write_text(json.dumps(gen, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def hf_key(name: str, multimodal: bool) -> str:
    """The checkpoint key we write for one of our parameter names."""
    if not multimodal:
        return f"model.{name}"
    for ours, theirs in HUB_LAYOUT:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise AssertionError(name)


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def link_if_stored(path: Path, root: Path) -> Path | None:
    """Replace `path` by a hard link to a file under `root` with the same bytes (the first found),
    and return that file; None (path kept as it is) when there is none or links are not possible."""
    size, mine = path.stat().st_size, None
    for other in sorted(root.rglob("*.safetensors")):
        if other == path or not other.is_file() or other.stat().st_size != size:
            continue
        if os.path.samefile(other, path):
            return other
        mine = mine or _digest(path)
        if _digest(other) != mine:
            continue
        tmp = path.with_name(path.name + ".link")
        try:
            os.link(other, tmp)
        except OSError:  # another file system, or one without hard links: keep the copy
            return None
        os.replace(tmp, path)
        return other
    return None


def atomic_write(path: Path, write) -> None:
    """Write through a temporary name and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
