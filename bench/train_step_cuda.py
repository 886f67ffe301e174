"""One training step of the Gemma 3 270M on a CUDA GPU: ours vs transformers, side by side, one run.

    python bench/train_step_cuda.py [--seq 1024] [--batches 1 4] [--steps 10] [--rows hf ours ours+compile]

The GPU counterpart of bench/train_step.py (CPU, float32, the real weights). Here both sides hold the
same randomly initialised 270M weights (the embedded GGUF need not travel to the GPU machine; speed
and memory do not depend on the values), float32 master weights, bf16 autocast, the same fused
AdamW (lr 1e-5) and the same seeded batch (BOS, then ids drawn from [3, 50000)):
- transformers: `Gemma3ForCausalLM(input_ids, labels=input_ids).loss`, SDPA attention;
- ours: `model.hidden_states(ids)` -> `chunked_cross_entropy(h[:, :-1], embedding, ids[:, 1:])`:
  no batch x seq x vocab logits.
Rows ("+"-joined switches): hf, hf+ckpt (gradient checkpointing), ours, ours+ckpt (activation
checkpointing), hf+compile and ours+compile (torch.compile of each decoder block). Each row runs in a fresh
subprocess; tokens/s is batch x seq over the median of --steps step times (CUDA-synchronised) after
--warmup steps; memory is torch.cuda.max_memory_allocated over the whole process. Every row's first
loss must equal transformers' within 2e-2 (bf16 autocast on both sides; asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_pair(side: str, seed: int):
    """Our 270M with seeded random weights, or transformers' model holding the same tensors."""
    from posttrain.model import PRESETS, build_model
    cfg = PRESETS["270m"]
    ours = build_model(cfg, device="cuda", seed=seed)
    if side == "ours":
        return ours, ours.embed_tokens.weight
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # the peer; the library never imports it

    from posttrain.hf_config import config_to_hf
    hf_cfg = Gemma3TextConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        hf = Gemma3ForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict({"model." + k: v for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    del ours
    return hf, hf.lm_head.weight


def run_side(args) -> dict:
    from posttrain.losses import chunked_cross_entropy
    torch.manual_seed(0)
    side, *switches = args.row.split("+")
    model, head = build_pair(side, args.seed)
    if "ckpt" in switches:
        if side == "hf":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing = True
    if "compile" in switches:  # each decoder block, on both sides
        for block in (model.model.layers if side == "hf" else model.layers):
            block.compile()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(3, 50_000, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    ids[:, 0] = 2
    ids = ids.cuda()

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if side == "hf":
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                loss = chunked_cross_entropy(model.hidden_states(ids)[:, :-1], head, ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = float(step())
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"loss": first, "step_s": statistics.median(times), "peak": torch.cuda.max_memory_allocated()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rows", nargs="+", default=["hf", "hf+ckpt", "ours", "ours+ckpt", "ours+compile"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_side(args)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for GPUs (bench/train_step.py runs on CPU)")
    print(f"Gemma 3 270M train step on {torch.cuda.get_device_name()}, seq {args.seq}, bf16 autocast, "
          f"fp32 master weights, fused AdamW; torch {torch.__version__}; median of {args.steps} steps")
    for batch in args.batches:
        records = {}
        for row in args.rows:
            cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--batch", str(batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--seed", str(args.seed)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"  {row}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            records[row] = json.loads(done.stdout.strip().splitlines()[-1])
        if "hf" not in records:
            continue
        ref = records["hf"]
        print(f"\nbatch {batch} x {args.seq}\n{'row':14s} {'tok/s':>9s} {'x hf':>6s} {'peak GiB':>9s} {'x hf':>6s} "
              f"{'step-1 loss':>12s}")
        for row, r in records.items():
            print(f"{row:14s} {batch * args.seq / r['step_s']:9.0f} {ref['step_s'] / r['step_s']:5.2f}x "
                  f"{r['peak'] / 2**30:9.2f} {r['peak'] / ref['peak']:5.2f}x {r['loss']:12.5f}", flush=True)
            assert abs(r["loss"] - ref["loss"]) < 2e-2, f"{row}: first loss {r['loss']} vs transformers' {ref['loss']}"


if __name__ == "__main__":
    main()
