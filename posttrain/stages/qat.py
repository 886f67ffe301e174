"""Stage `qat`: quantization-aware training (Gemma 3 report, section 2.3).

    summary = run_qat(cfg, student, tok)            # writes <run_dir>/<name>/qat/

The student computes with fake-quantized linear weights (posttrain.quant, format `qat.format`;
straight-through gradients into float master weights) and learns the probabilities of the float
model: by default its own weights as the stage starts, frozen (`qat.teacher=self`). It is the
distill loop (stages/distill.py) with the `qat` section's keys, so the targets (sampled-256 by
default), ZeRO 0-3, resume and the held-out metrics are the same. The held-out "before" is plain
post-training quantization of the starting weights (KL(float || quantized) and top-1 agreement),
"after" the trained quantized model.

While the format is set, everything that computes with the weights sees the quantized values: the
training forward, the sampler (on-policy targets), and every export: <stage dir>/final holds the
dequantized values (a plain HF directory), model-q4_0.gguf (format q4_0) and int4/ (format int4) the
packed files, with their sizes and bits per weight in the summary.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import Config
from ..model import Gemma3
from ..quant import set_format, snap_toward_grid_
from .distill import run_distill
from .loop import StageResult


def exporter(cfg: Config, tok, out_dir: Path):
    """What the qat stage writes beside its final model, given the trained model (rank 0)."""
    q = cfg.qat

    def write(model: Gemma3) -> dict:
        if not q.export:
            return {}
        if q.format == "q4_0":
            from ..gguf_export import write_gguf

            embedding = "q4_0" if q.quantize_embedding else "f16"
            return {"gguf_q4_0": write_gguf(model, out_dir / "model-q4_0.gguf", embedding=embedding)}
        if q.format == "int4":
            from ..int4_export import write_int4

            return {"int4": write_int4(model, tok, out_dir / "int4")}
        return {}  # sfp8: the final HF directory holds its values (no packed file format of ours yet)

    return write


def run_qat(cfg: Config, student: Gemma3, tok, teacher: Gemma3 | None = None) -> StageResult:
    """Quantization-aware training of `student` (in place: it computes quantized afterwards)."""
    q = cfg.qat
    out_dir = cfg.out_dir / "qat"
    if q.teacher == "self":
        teacher = copy.deepcopy(student).eval()  # the float model, before any fake quantization
        teacher.requires_grad_(False)
    elif teacher is None:
        raise ValueError("qat.teacher=model.teacher but no teacher was loaded")
    snap_toward_grid_(student, q.format, q.snap)  # its quantized values stay those of plain PTQ
    set_format(student, q.format, embedding=q.quantize_embedding)
    inner = cfg.model_copy(update={"distill": q})  # the distill loop reads its keys from cfg.distill
    result = run_distill(inner, student, teacher, tok, out_dir, stage="qat", exports=exporter(cfg, tok, out_dir))
    for name, info in result.summary.get("exports", {}).items():
        if info:
            print_rank0(f"qat: {name}: {info['path']}, {info['bytes'] / 2**20:.1f} MiB, "
                        f"{info['linear_bits_per_weight']:.2f} bits per linear weight, "
                        f"{info['bits_per_weight']:.2f} over all weights")
    return StageResult(result.final, {**result.summary, "format": q.format})


def print_rank0(message: str) -> None:
    from ..engine import rank

    if rank() == 0:
        print(message, flush=True)


__all__ = ["run_qat"]
