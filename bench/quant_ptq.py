"""Post-training quantization of the real Gemma 3 270M: what QAT has to beat.

    python bench/quant_ptq.py [--rows 128] [--formats q4_0 int4 sfp8]

Quantizes the seven linear weights of every block (the tied embedding stays float, as in Google's
files) with posttrain.quant and compares the quantized model with the float one on held-out text (the
bundled arithmetic_eval conversations, prompt and reply, every position): the mean per-token
KL(float || quantized) and top-1 agreement, each with a 95 % bootstrap interval over conversations.
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
    """(KL, top-1 agreement) per conversation, averaged over its positions."""
    out = []
    for ids in seqs:
        x = torch.tensor([ids])
        lp, lq = torch.log_softmax(ref(x)[0].double(), -1), torch.log_softmax(model(x)[0].double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
        out.append((kl, top1))
    return out


def interval(values, n_boot=2000, seed=0):
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = posttrain.load_tokenizer("gemma3-270m")
    ref = posttrain.load_model("gemma3-270m").eval()
    rows = data.load("arithmetic_eval")[: args.rows]
    seqs = [list(tok.apply_chat_template(to_messages(r)).ids) for r in rows]
    print(f"real Gemma 3 270M, float32; {len(seqs)} held-out conversations, {sum(map(len, seqs))} positions; "
          "linear weights quantized, embedding float")
    print(f"{'format':8} {'KL(float || q)':>16} {'95% interval':>22} {'top-1 agreement':>16} {'95% interval':>18}")
    for fmt in args.formats:
        scores = per_row(quantize_linear_(copy.deepcopy(ref), fmt).eval(), ref, seqs)
        kl, top1 = [s[0] for s in scores], [s[1] for s in scores]
        (kl_lo, kl_hi), (t_lo, t_hi) = interval(kl), interval(top1)
        print(f"{fmt:8} {sum(kl) / len(kl):16.5f} {f'[{kl_lo:.5f}, {kl_hi:.5f}]':>22} "
              f"{sum(top1) / len(top1):16.4f} {f'[{t_lo:.4f}, {t_hi:.4f}]':>18}")


if __name__ == "__main__":
    main()
