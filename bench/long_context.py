"""Long context on the real Gemma 3 270M: prefill ours vs transformers, passkey retrieval, and the
memory of a training step, from 2K to 32K tokens (the 270M's trained context), in one run.

    python bench/long_context.py [--lengths 2048 8192 16384 32768] [--parts prefill passkey train]
                                 [--depths 0.1 0.5 0.9] [--dtype float32|bfloat16] [--train-layers 6]
                                 [--hf-max 16384]

prefill  one prompt of T tokens (BOS, then ids drawn uniformly from [3, 50000), seeded) up to the
         next token's logits. Ours: `Sampler.generate(max_new_tokens=1)`, which prefills in chunks of
         512 tokens into a KV cache whose sliding layers are rings of 512 slots. transformers:
         `model(ids, use_cache=True, logits_to_keep=1)`, SDPA. Each side at each length runs in a
         fresh subprocess: wall time, and memory as the rise of the process's peak RSS (VmHWM) over
         its RSS once the model is loaded, also per token. Both must pick the same next token
         (asserted); a transformers row is skipped when its predicted masks (2 T^2 bytes) would not fit
         in the memory available.
passkey  a five-digit number hidden at each --depth of filler text, the prompt ending "What is the pass
         key? The pass key is"; the greedy answer (temperature 0, 8 tokens) must contain the number.
         Accuracy per length and depth, ours only. The 270M is a pretrained model, not instruction-tuned.
train    one training step (forward, backward, AdamW) of the 270M cut to its first --train-layers
         layers (layer 5 is global; 0 = all 18), activation checkpointing on, the chunked loss (1024
         tokens), the embedding frozen, on one row packed with documents of 300-3000 tokens (positions
         restart per document): peak RSS rise against the planner's formula (posttrain/plan.py:
         gradients, Adam states, activations, logits chunk) at each length. Flat bytes per token from
         2K to 32K is what "linear memory" means.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import torch

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def random_ids(T: int) -> list[int]:
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(3, 50_000, (T,), generator=g)
    ids[0] = 2
    return ids.tolist()


# ----------------------------------------------------------------------------- one measurement per process

def prefill_ours(T: int, dtype: torch.dtype) -> dict:
    import posttrain
    from posttrain.sampler import Sampler

    model = posttrain.load_model("gemma3-270m", dtype=dtype)
    sampler = Sampler(model, pack_weights=False)  # packing only speeds decoding, and copies the weights
    sampler.generate([random_ids(64)], max_new_tokens=1, temperature=0)  # warm-up
    base, ids = rss(), random_ids(T)
    start = time.perf_counter()
    out = sampler.generate([ids], max_new_tokens=1, temperature=0, stop_token_ids=[])
    return {"s": time.perf_counter() - start, "rise": rss("VmHWM") - base, "token": out[0][0].tokens[0]}


def prefill_hf(T: int, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM  # the peer; benchmarks may import it, the library never does

    from posttrain.checkpoint import embedded_hf_dir

    model = AutoModelForCausalLM.from_pretrained(embedded_hf_dir(), dtype=dtype, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        model(torch.tensor([random_ids(64)]), use_cache=True, logits_to_keep=1)  # warm-up, pages the weights in
        base, ids = rss(), torch.tensor([random_ids(T)])
        start = time.perf_counter()
        logits = model(ids, use_cache=True, logits_to_keep=1).logits
    return {"s": time.perf_counter() - start, "rise": rss("VmHWM") - base, "token": int(logits[0, -1].argmax())}


def passkey(T: int, depths: list[float], dtype: torch.dtype) -> dict:
    import posttrain
    from posttrain.sampler import Sampler
    from posttrain.tokenizer import load_tokenizer

    tok, model = load_tokenizer("gemma3-270m"), posttrain.load_model("gemma3-270m", dtype=dtype)
    sampler, rng = Sampler(model, pack_weights=False), random.Random(T)
    per_filler = len(tok.encode(FILLER * 10)) / 10
    fixed = len(tok.encode(PASSKEY_INTRO + QUESTION)) + 40
    n_filler = int((T - fixed) / per_filler)
    results = []
    for depth in depths:
        key = rng.randint(10_000, 99_999)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        at = int(n_filler * depth)
        text = PASSKEY_INTRO + FILLER * at + needle + FILLER * (n_filler - at) + QUESTION
        ids = [2] + tok.encode(text)
        start = time.perf_counter()
        out = sampler.generate([ids], max_new_tokens=8, temperature=0)[0][0]
        answer = tok.decode(out.tokens)
        results.append({"depth": depth, "tokens": len(ids), "key": key, "answer": answer.strip(),
                        "ok": str(key) in answer, "s": time.perf_counter() - start})
    return {"results": results}


def train_step(T: int, layers: int, dtype: torch.dtype) -> dict:
    import posttrain
    from posttrain.losses import chunked_cross_entropy
    from posttrain.model import prune_layers
    from posttrain.plan import LOGIT_COPIES, activation_bytes

    model = posttrain.load_model("gemma3-270m", dtype=dtype)
    if layers:
        model = prune_layers(model, list(range(layers)))
    model.train()
    model.activation_checkpointing = True
    model.embed_tokens.weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-5)
    rng = random.Random(T)
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(rng.randint(300, 3000), T - sum(lengths)))
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.tensor([random_ids(T)])
    base = rss()
    start = time.perf_counter()
    hidden = model.hidden_states(ids, positions, segments)
    same_doc = segments[:, 1:] == segments[:, :-1]  # no loss across a document boundary
    loss = chunked_cross_entropy(hidden[:, :-1], model.embed_tokens.weight, ids[:, 1:], same_doc, chunk_tokens=1024)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep the gradient buffers, as the engine does
    seconds, rise = time.perf_counter() - start, rss("VmHWM") - base
    b, n = 4 if dtype == torch.float32 else 2, sum(p.numel() for p in trained)
    planned = {"gradients": b * n, "Adam states": 8 * n, "activations": activation_bytes(model.config, T, b, True),
               "logits chunk": min(1024, T) * model.config.vocab_size * 4 * LOGIT_COPIES}
    return {"s": seconds, "rise": rise, "planned": planned, "loss": float(loss)}


def one(args) -> None:
    dtype = getattr(torch, args.dtype)
    part, side, T = args.one
    T = int(T)
    if part == "prefill":
        out = (prefill_ours if side == "ours" else prefill_hf)(T, dtype)
    elif part == "passkey":
        out = passkey(T, args.depths, dtype)
    else:
        out = train_step(T, args.train_layers, dtype)
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------- the driver

def run(args, part: str, side: str, T: int) -> dict | None:
    cmd = [sys.executable, __file__, "--one", part, side, str(T), "--dtype", args.dtype,
           "--train-layers", str(args.train_layers), "--depths", *map(str, args.depths)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"  {part} {side} T={T} failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
        return None
    return json.loads(lines[-1][7:])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    ap.add_argument("--parts", nargs="+", default=["prefill", "passkey", "train"],
                    choices=["prefill", "passkey", "train"])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--train-layers", type=int, default=6)
    ap.add_argument("--hf-max", type=int, default=None, help="skip transformers above this length (its time "
                    "grows with T^2: about 20 minutes at 32K on 2 cores)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.one:
        return one(args)
    print(f"real Gemma 3 270M, {args.dtype}, {torch.get_num_threads()} threads; memory = peak RSS rise over "
          "the loaded model, one fresh process per cell")
    if "prefill" in args.parts:
        print(f"\nprefill  {'T':>6} {'ours s':>8} {'HF s':>8} {'HF/ours':>8} {'ours GB':>8} {'HF GB':>8} "
              f"{'ours KB/tok':>12} {'HF KB/tok':>10}  same next token")
        for T in args.lengths:
            ours = run(args, "prefill", "ours", T)
            hf = None
            if args.hf_max is not None and T > args.hf_max:
                print(f"  transformers at T={T} skipped (--hf-max {args.hf_max})")
            elif 2 * T * T + 3e9 < 0.8 * available_bytes():
                hf = run(args, "prefill", "hf", T)
            else:
                print(f"  transformers at T={T} skipped: its masks alone need {gb(2 * T * T)} GB")
            if ours is None:
                continue
            cells = [f"{T:>6}", f"{ours['s']:8.2f}", f"{hf['s']:8.2f}" if hf else f"{'-':>8}",
                     f"{hf['s'] / ours['s']:7.2f}x" if hf else f"{'-':>8}", f"{gb(ours['rise']):>8}",
                     f"{gb(hf['rise']):>8}" if hf else f"{'-':>8}", f"{ours['rise'] / T / 1e3:12.1f}",
                     f"{hf['rise'] / T / 1e3:10.1f}" if hf else f"{'-':>10}"]
            same = "-" if hf is None else ("yes" if hf["token"] == ours["token"] else "NO")
            print("         " + " ".join(cells) + f"  {same}")
            assert hf is None or hf["token"] == ours["token"], (T, ours, hf)
    if "passkey" in args.parts:
        print(f"\npasskey  {'T':>6} " + " ".join(f"{f'depth {d:.0%}':>10}" for d in args.depths) + "  accuracy   s")
        for T in args.lengths:
            out = run(args, "passkey", "ours", T)
            if out is None:
                continue
            res = out["results"]
            cells = [f"{('ok' if r['ok'] else 'miss ' + r['answer'][:5]):>10}" for r in res]
            acc = sum(r["ok"] for r in res) / len(res)
            print(f"         {T:>6} " + " ".join(cells) + f"  {acc:8.2f} {sum(r['s'] for r in res):5.0f}")
    if "train" in args.parts:
        layers = args.train_layers or 18
        print(f"\ntrain step, {layers} layers, checkpointed, chunked loss, embedding frozen")
        print(f"         {'T':>6} {'s':>7} {'rise GB':>8} {'planned GB':>11} {'rise/planned':>13} {'KB/tok':>8}")
        for T in args.lengths:
            out = run(args, "train", "ours", T)
            if out is None:
                continue
            planned = sum(out["planned"].values())
            print(f"         {T:>6} {out['s']:7.1f} {gb(out['rise']):>8} {gb(planned):>11} "
                  f"{out['rise'] / planned:12.2f}x {out['rise'] / T / 1e3:8.1f}")


if __name__ == "__main__":
    main()
