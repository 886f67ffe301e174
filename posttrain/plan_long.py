"""Long-context memory tables: what Gemma 3's 5:1 local/global layers save, and what sequence
parallelism divides.

    python -m posttrain.plan_long [--tokens 131072] [--sizes 4b 12b 27b] [--degrees 1 2 4 8]

KV cache of one sequence of T tokens in bf16 (2 bytes per value): every layer keeps 2 K D values
per token, but a sliding layer only its last W tokens (a ring; sampler.py), so

    5:1 + window: 2 K D x 2 bytes x (G T + S min(W, T))    all global: 2 K D x 2 bytes x L T

for G global and S = L - G sliding layers (Gemma 3 report, section 2.2 and Figure 6). Activations of
one training sequence follow posttrain/plan.py (activation checkpointing on, bf16): each of N
sequence-parallel ranks holds T / N tokens of every activation, and its attention sees all T tokens
for H / N heads.
"""

from __future__ import annotations

import argparse

from .model import PRESETS, GemmaConfig
from .plan import GiB, activation_bytes
from .sampler import kv_cache_bytes

SIZES = ("4b", "12b", "27b")
DEGREES = (1, 2, 4, 8)


def kv_cache_gib(arch: GemmaConfig, tokens: int) -> dict[str, float]:
    """KV cache of one sequence in GiB (bf16): Gemma 3's layout and the same model all global."""
    return {"5:1 + window": kv_cache_bytes(arch, tokens) / GiB,
            "all global": kv_cache_bytes(arch, tokens, ring=False) / GiB}


def activations_gib(arch: GemmaConfig, tokens: int, degree: int, checkpointing: bool = True) -> float:
    """Activations of one training sequence per rank, in GiB (bf16), split over `degree` ranks."""
    return activation_bytes(arch, -(-tokens // degree), 2, checkpointing) / GiB


def table(tokens: int = 131_072, sizes=SIZES, degrees=DEGREES) -> str:
    """The KV-cache and activation table for the presets `sizes` at `tokens` tokens."""
    lines = [f"one sequence of {tokens:,} tokens, bf16, GiB per device",
             f"  {'model':<6}{'KV 5:1+window':>15}{'KV all-global':>15}"
             + "".join(f"{f'act. SP={n}':>12}" for n in degrees)]
    for size in sizes:
        arch = PRESETS[size]
        kv = kv_cache_gib(arch, tokens)
        lines.append(f"  {size:<6}{kv['5:1 + window']:>15.2f}{kv['all global']:>15.2f}"
                     + "".join(f"{activations_gib(arch, tokens, n):>12.2f}" for n in degrees))
    lines.append("  act.: activations of a training step with activation checkpointing, per sequence-parallel "
                 "degree (distributed.sequence_parallel)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=sorted(PRESETS))
    ap.add_argument("--degrees", nargs="+", type=int, default=list(DEGREES))
    args = ap.parse_args(argv)
    print(table(args.tokens, args.sizes, args.degrees))


if __name__ == "__main__":
    main()
