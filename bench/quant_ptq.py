"""Post-training quantization of the real Gemma 3 270M: what QAT has to beat, and what it did.

    python bench/quant_ptq.py [--rows 128] [--formats q4_0 int4 sfp8]
    python bench/quant_ptq.py --exported runs/qat/qat_demo/qat/model-q4_0.gguf runs/qat_int4/qat_demo/qat/int4
    python bench/quant_ptq.py --exported ... --positions replies     # only what the qat stage trains

Quantizes the seven linear weights of every block (the tied embedding stays float, as in Google's
files) with posttrain.quant and compares the quantized model with the float one on held-out text (the
bundled arithmetic_eval conversations, prompt and reply, every position): the mean per-token
KL(float || quantized) and top-1 agreement, each with a 95 % bootstrap interval over conversations.

--exported: files the qat stage wrote (a Q4_0 GGUF, or an int4 directory), each read back by our
loaders and compared with the same format's post-training quantization of the float model, exported
and read back the same way (so both carry the file's F16 / bf16 embedding): KL and top-1 of each,
and the paired per-conversation difference (exported QAT - PTQ) with its 95 % bootstrap interval.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch

# bench/rewards.py would shadow the rewards package that posttrain imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import data  # noqa: E402
import posttrain  # noqa: E402
from posttrain.data import to_messages  # noqa: E402
from posttrain.quant import FORMATS, quantize_linear_  # noqa: E402


@torch.no_grad()
def per_row(model, ref, seqs):
    """(KL, top-1 agreement) per conversation, averaged over its positions (seqs: (ids, positions or None))."""
    out = []
    for ids, where in seqs:
        x = torch.tensor([ids])
        lp, lq = torch.log_softmax(ref(x)[0].double(), -1), torch.log_softmax(model(x)[0].double(), -1)
        if where is not None:
            lp, lq = lp[where], lq[where]
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
        out.append((kl, top1))
    return out


def interval(values, n_boot=2000, seed=0):
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def read_back(path: Path):
    """(format, model) of an exported file: a Q4_0 GGUF or an int4 directory."""
    from posttrain.int4_export import load_int4

    if path.suffix == ".gguf":
        return "q4_0", posttrain.load_model(path).eval()
    return "int4", load_int4(path).eval()


def ptq_export(ref, fmt: str, tmp: Path):
    """The float model quantized after training, written in `fmt`'s file format and read back."""
    from posttrain.gguf_export import write_gguf
    from posttrain.int4_export import write_int4

    if fmt == "q4_0":
        write_gguf(ref, tmp / "ptq.gguf")
        return read_back(tmp / "ptq.gguf")[1]
    write_int4(ref, None, tmp / "ptq-int4")
    return read_back(tmp / "ptq-int4")[1]


def compare_exported(paths, ref, seqs) -> None:
    import tempfile

    print(f"{'file':44} {'KL QAT':>8} {'KL PTQ':>8} {'QAT - PTQ [95%]':>26} {'top-1 QAT':>10} {'PTQ':>7} "
          f"{'QAT - PTQ [95%]':>24}")
    for path in map(Path, paths):
        fmt, model = read_back(path)
        with tempfile.TemporaryDirectory() as tmp:
            base = ptq_export(ref, fmt, Path(tmp))
        q, b = per_row(model, ref, seqs), per_row(base, ref, seqs)
        dkl, dtop = [x[0] - y[0] for x, y in zip(q, b)], [x[1] - y[1] for x, y in zip(q, b)]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        (k_lo, k_hi), (t_lo, t_hi) = interval(dkl), interval(dtop)
        kq, kb = mean([x[0] for x in q]), mean([y[0] for y in b])
        print(f"{str(path)[-44:]:44} {kq:8.4f} {kb:8.4f} {f'{mean(dkl):+.4f} [{k_lo:+.4f}, {k_hi:+.4f}]':>26} "
              f"{mean([x[1] for x in q]):10.4f} {mean([y[1] for y in b]):7.4f} "
              f"{f'{mean(dtop):+.4f} [{t_lo:+.4f}, {t_hi:+.4f}]':>24}   ({fmt}, KL {100 * (kq / kb - 1):+.0f} %)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    ap.add_argument("--exported", nargs="+", default=None, help="files the qat stage wrote, against PTQ")
    ap.add_argument("--positions", choices=["all", "replies"], default="all",
                    help="replies: only the positions that predict a reply token (what the qat stage trains "
                    "and its held-out evaluation scores)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = posttrain.load_tokenizer("gemma3-270m")
    ref = posttrain.load_model("gemma3-270m").eval()
    rows = data.load("arithmetic_eval")[: args.rows]
    seqs = []
    for r in rows:
        enc = tok.apply_chat_template(to_messages(r))
        ids, mask = list(enc.ids), list(enc.loss_mask)
        where = [j - 1 for j in range(1, len(ids)) if mask[j]] if args.positions == "replies" else None
        seqs.append((ids, where))
    count = sum(len(ids) if w is None else len(w) for ids, w in seqs)
    print(f"real Gemma 3 270M, float32; {len(seqs)} held-out conversations, {count} positions ({args.positions}); "
          "linear weights quantized, embedding float")
    if args.exported:
        return compare_exported(args.exported, ref, seqs)
    print(f"{'format':8} {'KL(float || q)':>16} {'95% interval':>22} {'top-1 agreement':>16} {'95% interval':>18}")
    for fmt in args.formats:
        scores = per_row(quantize_linear_(copy.deepcopy(ref), fmt).eval(), ref, seqs)
        kl, top1 = [s[0] for s in scores], [s[1] for s in scores]
        (kl_lo, kl_hi), (t_lo, t_hi) = interval(kl), interval(top1)
        print(f"{fmt:8} {sum(kl) / len(kl):16.5f} {f'[{kl_lo:.5f}, {kl_hi:.5f}]':>22} "
              f"{sum(top1) / len(top1):16.4f} {f'[{t_lo:.4f}, {t_hi:.4f}]':>18}")


if __name__ == "__main__":
    main()
