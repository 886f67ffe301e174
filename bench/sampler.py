"""Our sampler vs transformers `generate` on the real Gemma 3 270M, side by side, in one run.

    python bench/sampler.py [--repeats 3] [--new-tokens 128] [--prompt-tokens 64]

Greedy decoding of random 64-token prompts, 128 new tokens each (no early stop), batch 1 and 8,
float32 and bfloat16. For each: tokens/s of both (median of --repeats runs), the ratio, and the
fraction of the memory-bandwidth roofline: every decode step must read all weights once, so
tokens/s <= batch * bandwidth / weight bytes, with the bandwidth measured here by a large read.
Last, the KV-cache bytes for long contexts computed on the meta device (no memory used),
against a full-length cache. Quote ratios, not absolute numbers: this machine is shared.

    python bench/sampler.py --half-stop 32 [--repeats 3] [--new-tokens 128]

runs only the early-stop case, ours alone, float32: a batch whose first half samples <eos> at its
8th token (forced) while the rest run to --new-tokens, against the same batch where nothing stops
(the same forced token, not a stop token there). Stopped rows leave the batch, so the ratio of the
two times is what the decoded tokens cost.
"""

from __future__ import annotations

import argparse

import torch

import posttrain
from posttrain.checkpoint import embedded_hf_dir
from posttrain.sampler import KVCache, Sampler, kv_cache_bytes
from timing import median_seconds


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a plain read of a 1 GiB float32 buffer (a sum): the decode roofline's denominator."""
    buf = torch.ones(2**28)
    buf.sum()
    return buf.numel() * 4 / median_seconds(buf.sum, repeats)


def half_stopped(sampler: Sampler, prompts: list[list[int]], new_tokens: int, repeats: int,
                 stop_after: int = 8) -> tuple[float, float]:
    """Seconds (median) of the batch where nothing stops and of the batch whose first half stops."""
    import posttrain.sampler as sampling

    real, calls = sampling.sample_tokens, [0]

    def forced(logits, *args):
        token = real(logits, *args)
        if calls[0] == stop_after - 1:
            token[: len(prompts) // 2] = 1  # <eos>
        calls[0] += 1
        return token

    def run(stop_ids):
        calls[0], sampling.sample_tokens = 0, forced
        try:
            sampler.generate(prompts, max_new_tokens=new_tokens, temperature=0, stop_token_ids=stop_ids)
        finally:
            sampling.sample_tokens = real

    run([]), run([1])  # warm-up
    return median_seconds(lambda: run([]), repeats), median_seconds(lambda: run([1]), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--half-stop", type=int, metavar="BATCH", help="only the early-stop case at this batch")
    args = ap.parse_args()
    if args.half_stop:
        g = torch.Generator().manual_seed(0)
        prompts = [[2] + torch.randint(3, 50_000, (args.prompt_tokens - 1,), generator=g).tolist()
                   for _ in range(args.half_stop)]
        sampler = Sampler(posttrain.load_model("gemma3-270m", dtype=torch.float32))
        full, half = half_stopped(sampler, prompts, args.new_tokens, args.repeats)
        tokens = args.half_stop // 2 * 8 + (args.half_stop - args.half_stop // 2) * args.new_tokens
        print(f"batch {args.half_stop}, float32, {args.new_tokens} new tokens, median of {args.repeats}: "
              f"nothing stops {full:.1f} s; half stop after 8 tokens {half:.1f} s = {half / full:.2f} of it "
              f"(decoded tokens: {tokens / (args.half_stop * args.new_tokens):.2f} of them)")
        return
    from transformers import AutoModelForCausalLM  # the peer; the library itself never imports it

    bandwidth = read_bandwidth()
    print(f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy")
    print(f"{'dtype':9s} {'batch':>5s} {'ours tok/s':>11s} {'hf tok/s':>9s} {'ours/hf':>8s} "
          f"{'ours %roofline':>15s} {'hf %roofline':>13s}")
    g = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours_model = posttrain.load_model("gemma3-270m", dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(embedded_hf_dir(), dtype=dtype, attn_implementation="sdpa").eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in ours_model.parameters())
        sampler = Sampler(ours_model)
        for batch in args.batches:
            prompts = [[2] + torch.randint(3, 50_000, (args.prompt_tokens - 1,), generator=g).tolist()
                       for _ in range(batch)]
            ids = torch.tensor(prompts)

            def run_ours():
                sampler.generate(prompts, max_new_tokens=args.new_tokens, temperature=0, stop_token_ids=[])

            def run_hf():
                with torch.inference_mode():
                    hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

            run_ours(), run_hf()  # warm-up
            tokens = batch * args.new_tokens
            ours, theirs = tokens / median_seconds(run_ours, args.repeats), tokens / median_seconds(run_hf, args.repeats)
            roofline = batch * bandwidth / weight_bytes
            print(f"{dtype_name:9s} {batch:5d} {ours:11.1f} {theirs:9.1f} {ours / theirs:7.2f}x "
                  f"{100 * ours / roofline:14.0f}% {100 * theirs / roofline:12.0f}%")

    print("\nKV cache, bf16, one sequence (allocated on the meta device):")
    for name, context in (("270m", 32_768), ("4b", 131_072)):
        cfg = posttrain.PRESETS[name]
        ours = KVCache(cfg, rows=1, length=context, dtype=torch.bfloat16, device=torch.device("meta")).nbytes()
        full = kv_cache_bytes(cfg, context, ring=False)
        print(f"  {name:5s} {context:>7,d} tokens: ours {ours / 2**20:8.1f} MiB, full-length cache "
              f"{full / 2**20:8.1f} MiB, {full / ours:.1f}x less")


if __name__ == "__main__":
    main()
