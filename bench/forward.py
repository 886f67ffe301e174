"""Forward pass of the real Gemma 3 270M: ours vs transformers, side by side, in one run.

    python bench/forward.py [--repeats 5] [--batch 2] [--seq 512] [--dtype float32|bfloat16]

Both models hold the same weights (the embedded GGUF). Reports the median wall time of a full
forward (logits included) and of the hidden states alone (what chunked losses use), with the
ratio transformers / ours, so numbers from this shared, noisy machine compare fairly.
"""

from __future__ import annotations

import argparse

import torch

import posttrain
from posttrain.checkpoint import embedded_hf_dir
from timing import median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM  # the peer; benchmarks may import it, the library never does

    dtype = getattr(torch, args.dtype)
    ours = posttrain.load_model("gemma3-270m", dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(embedded_hf_dir(), dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 50_000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    tokens = args.batch * args.seq
    rows = []
    with torch.inference_mode():
        ours(ids), theirs(ids)  # warm-up
        t_ours = median_seconds(lambda: ours(ids), args.repeats)
        t_theirs = median_seconds(lambda: theirs(ids).logits, args.repeats)
        rows.append(("forward + logits", t_ours, t_theirs))
        t_ours = median_seconds(lambda: ours.hidden_states(ids), args.repeats)
        t_theirs = median_seconds(lambda: theirs.model(ids).last_hidden_state, args.repeats)
        rows.append(("hidden states only", t_ours, t_theirs))
    print(f"Gemma 3 270M, {args.dtype}, batch {args.batch} x {args.seq} tokens, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':20s} {'ours tok/s':>12s} {'transformers tok/s':>19s} {'ours / transformers':>20s}")
    for name, a, b in rows:
        print(f"{name:20s} {tokens / a:12.0f} {tokens / b:19.0f} {b / a:19.2f}x")


if __name__ == "__main__":
    main()
