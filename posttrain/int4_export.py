"""The int4 checkpoint: packed 4-bit linear weights and their scales as safetensors, and its loader.

    sizes = write_int4(model, tok, "runs/x/qat/int4")     # config.json, tokenizer, model.int4.safetensors
    model = load_int4("runs/x/qat/int4")                  # a Gemma3 holding the dequantised values

Layout of model.int4.safetensors (metadata "format": "posttrain-int4", "version": "1"), in our parameter
names (posttrain.model; the HF names without the `model.` prefix):
- each of the seven linear weights of a block (posttrain.quant.LINEAR), `<module>.weight` (out, in)
  with `in` even, e.g. layers.0.mlp.down_proj.weight, as `<module>.qweight`: uint8 (out, in / 2),
  column 2j in the low nibble and 2j + 1 in the high one, each nibble q + 8 for q in [-8, 7]; and
  `<module>.scale`: float32 (out,), s = 7 / max|w_row|.
  The weight is (q / max(s, 1e-6)), exactly posttrain.quant.int4's value.
- every other tensor (embedding, norms) as it is: the embedding in `embedding_dtype` (bfloat16 by
  default, as Google's files keep it in 16 bits), norms in float32.
config.json is the HF config, so the architecture reads like any checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError
from .hf_config import config_from_hf, config_to_hf
from .model import Gemma3
from .quant import is_linear

FILE = "model.int4.safetensors"
FORMAT = "posttrain-int4"


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (qweight uint8 (out, in / 2), scale float32 (out,))."""
    if w.ndim != 2 or w.shape[1] % 2:
        raise UserError(f"int4 packing needs a matrix with an even number of columns, got shape {tuple(w.shape)}")
    x = w.detach().float()
    s = 7.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)  # as posttrain.quant.int4
    q = (torch.clamp(torch.round(x * s), -8, 7) + 8).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4), s[:, 0]


def unpack(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight (out, in) that pack() stored."""
    low, high = (qweight & 0xF).float() - 8, (qweight >> 4).float() - 8
    q = torch.stack([low, high], dim=-1).reshape(qweight.shape[0], -1)
    return q / scale.float()[:, None].clamp_min(1e-6)


def write_int4(model: Gemma3, tokenizer, out_dir: str | Path, *, embedding_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the text model's int4 checkpoint to out_dir; returns the file's size and bits per weight
    (over the linear weights and over all weights). A vision tower is not written."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, linear_params, linear_bytes, total = {}, 0, 0, 0
    for name, p in model.state_dict().items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        total += p.numel()
        if is_linear(name):
            qweight, scale = pack(p.cpu())
            module = name[: -len(".weight")]
            tensors[module + ".qweight"], tensors[module + ".scale"] = qweight.contiguous(), scale.contiguous()
            linear_params += p.numel()
            linear_bytes += qweight.numel() + 4 * scale.numel()
        else:
            dtype = embedding_dtype if name == "embed_tokens.weight" else torch.float32
            tensors[name] = p.detach().cpu().to(dtype).contiguous()
    meta = {"format": FORMAT, "version": "1"}
    atomic_write(out / FILE, lambda path: save_file(tensors, str(path), metadata=meta))
    text = model.config.with_(vision=None)
    hf = config_to_hf(text, dtype=embedding_dtype)
    atomic_write(out / "config.json", lambda path: path.write_text(json.dumps(hf, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    size = (out / FILE).stat().st_size
    return {"path": str(out / FILE), "bytes": size, "linear_bits_per_weight": 8 * linear_bytes / max(linear_params, 1),
            "bits_per_weight": 8 * size / max(total, 1)}


def load_int4(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma3:
    """A Gemma3 holding the dequantised values of an int4 checkpoint written by write_int4."""
    from safetensors import safe_open

    from .checkpoint import assign_weights

    root = Path(path)
    file = root / FILE
    if not file.is_file() or not (root / "config.json").is_file():
        raise UserError(f"{root}: not an int4 checkpoint (needs config.json and {FILE}); fix: write one with "
                        "posttrain.int4_export.write_int4 (the qat stage does, qat.format=int4)")
    cfg = config_from_hf(json.loads((root / "config.json").read_text()), where=str(root / "config.json"))
    with safe_open(str(file), framework="pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise UserError(f"{file}: metadata format is {(f.metadata() or {}).get('format')!r}, not {FORMAT!r}; "
                            "fix: load it with posttrain.load_model if it is a plain safetensors checkpoint")
        keys = set(f.keys())

        def tensors():
            for key in sorted(keys):
                if key.endswith(".scale"):
                    continue
                if key.endswith(".qweight"):
                    module = key[: -len(".qweight")]
                    yield module + ".weight", unpack(f.get_tensor(key), f.get_tensor(module + ".scale"))
                else:
                    yield key, f.get_tensor(key)

        model = assign_weights(cfg, tensors(), dtype=dtype, device=device, where=str(file))
    return model.eval()


__all__ = ["write_int4", "load_int4", "pack", "unpack", "FILE"]
