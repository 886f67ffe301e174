"""One training step of the real Gemma 3 270M: ours vs transformers, side by side, in one run.

    python bench/train_step.py [--seq 1024] [--batch 1] [--steps 2] [--rounds 2] [--threads N] [--rows ROW ...]
    python bench/train_step.py --side ours --oib --sparse-embed --ckpt --tied-head --chunk 128 --profile 25

A step is forward + backward + optimizer step, float32 on CPU, on the same seeded batch (BOS, then
token ids drawn uniformly from [3, 50000) of the real vocabulary) with the same optimizer on both
sides: torch.optim.AdamW, lr 1e-5, and the same --adamw implementation (fused by default).
- transformers: `Gemma3ForCausalLM(input_ids, labels=input_ids).loss` (it shifts the labels
  itself), SDPA attention, then `loss.backward(); opt.step(); opt.zero_grad()`;
- ours: `model.hidden_states(ids)` -> `chunked_cross_entropy(h[:, :-1], embedding weight,
  ids[:, 1:])`, never batch x seq x vocab logits, with the switches of the row.
Both losses are the mean over the same seq - 1 predicted tokens; every row's first-step loss
must equal transformers' within 1e-3 (asserted): the same computation.

Each row runs in a fresh subprocess of this script (`--side ...`), so memory is per row: the
process's whole peak RSS (VmHWM), and its rise over the RSS once the model is loaded and its
memory-mapped weights are paged in (about 1.3 GB, 1.07 GB of it the weights). Tokens/s is batch x
seq over the median step time after --warmup steps (bench/timing.py); cpu-s is the process's
median CPU time per step. The machine is shared: the transformers row and the headline row run
once per --rounds, interleaved with the other rows, and the table takes the median over their
processes; the load average is printed per row. When another job holds a core, two OpenMP threads
per row wait on each other (steps several times slower, unevenly by op): compare with --threads 1
and the cpu-s column then. Rows,
"+"-joined switches (all rows use the same optimizer and dtype):
  hf         transformers, the reference (hf+ckpt: with gradient checkpointing)
  ours       ours, the plain step: loss.backward(); opt.step(); opt.zero_grad()
  +oib       optimizer in backward (bench/step_memory.py: OptimizerInBackward): each parameter is
             stepped from its post-accumulate-grad hook and its gradient freed at once
  +sparse    the embedding lookup's gradient as a sparse tensor (seq rows, not a dense 262k x 640
             zeros buffer); the tied head's dense gradient absorbs it
  +ckpt      activation checkpointing: each block is recomputed in backward
  +tied      (with +oib) the tied head's gradient is computed and applied in blocks of
             --head-block vocabulary rows at the end of backward, so no (V, C) gradient exists;
             one more head GEMM per step (OptimizerInBackward(tied_head=...).cross_entropy)
  +chunkN    the chunked loss in chunks of N tokens (default 1024): 2 live (N, V) float32 buffers
  +qblockN   attention in blocks of N queries when masked (posttrain.model.ATTENTION_QUERY_BLOCK,
             1024 as shipped): a sliding-window block then skips the keys outside its window
  +recompute chunked loss with fused=False: nothing held from forward, one more head GEMM
  +compile   torch.compile each decoder block
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
from timing import median_seconds

DEFAULT_ROWS = ["ours", "ours+oib+sparse", "ours+oib+sparse+ckpt", "ours+oib+sparse+ckpt+chunk128"]
HEADLINE = "ours+oib+sparse+ckpt+tied+chunk128"
SWITCHES = {"ckpt": "--ckpt", "oib": "--oib", "sparse": "--sparse-embed", "tied": "--tied-head",
            "recompute": "--recompute", "compile": "--compile"}


def proc_status(field: str) -> int:
    """A memory line of /proc/self/status in bytes (VmRSS now, VmHWM the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class PhasePeaks:
    """Peak RSS per phase of the step, sampled every 5 ms by a thread (--phases)."""

    def __init__(self):
        self.phase, self.peaks, self._stop = "idle", {}, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), proc_status("VmRSS"))
            time.sleep(0.005)

    def stop(self) -> dict:
        self._stop = True
        self._thread.join()
        return self.peaks


def make_batch(batch: int, seq: int, seed: int) -> torch.Tensor:
    ids = torch.randint(3, 50_000, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2  # BOS
    return ids


def make_adamw(params, impl: str, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, foreach=impl == "foreach", fused=True if impl == "fused" else None)


def run_side(args) -> dict:
    """One side in this process: load, --warmup steps, --steps timed steps. Returns the record."""
    import posttrain
    from posttrain.checkpoint import embedded_hf_dir
    from posttrain.losses import chunked_cross_entropy

    if args.tied_head and not args.oib:
        raise SystemExit("--tied-head needs --oib")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = embedded_hf_dir()
    if args.side == "hf":
        # the peer; the library itself never imports it
        from transformers import Gemma3ForCausalLM
        model = Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=args.hf_attn)
        if args.ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        head_weight = model.lm_head.weight
        assert model.get_input_embeddings().weight is head_weight  # tied, as ours
    else:
        if args.query_block:
            import posttrain.model
            posttrain.model.ATTENTION_QUERY_BLOCK = args.query_block
        model = posttrain.load_model(path)
        model.activation_checkpointing = args.ckpt
        model.embed_tokens.sparse = args.sparse_embed
        head_weight = model.embed_tokens.weight
        if args.compile:
            for block in model.layers:
                block.compile()
    model.train()
    ids = make_batch(args.batch, args.seq, args.seed)
    with torch.no_grad():  # page in the memory-mapped weights, so the baseline holds the model
        sum(float(p.sum()) for p in model.parameters())
    gc.collect()
    loaded = proc_status("VmRSS")

    opt = oib = None
    if args.oib:
        from step_memory import OptimizerInBackward
        oib = OptimizerInBackward(model.parameters(), lambda ps: make_adamw(ps, args.adamw, args.lr),
                                  tied_head=head_weight if args.tied_head else None, head_block_rows=args.head_block)
    else:
        opt = make_adamw(model.parameters(), args.adamw, args.lr)

    if args.side == "hf":
        def forward():
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    elif args.tied_head:
        def forward():
            return oib.cross_entropy(model.hidden_states(ids)[:, :-1], ids[:, 1:], chunk_tokens=args.chunk)
    else:
        def forward():
            return chunked_cross_entropy(model.hidden_states(ids)[:, :-1], head_weight, ids[:, 1:],
                                         chunk_tokens=args.chunk, fused=not args.recompute)

    phases = PhasePeaks() if args.phases else None

    def step() -> float:
        if phases:
            phases.phase = "forward"
        loss = forward()
        if phases:
            phases.phase = "backward"
        loss.backward()
        if phases:
            phases.phase = "optimizer"
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if phases:
            phases.phase = "idle"
        return loss.item()

    losses = [step() for _ in range(max(args.warmup, 1))]  # the first allocates AdamW's state
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    cpu = []

    def timed_step():
        start = time.process_time()
        step()
        cpu.append(time.process_time() - start)

    seconds = median_seconds(timed_step, args.steps) if args.steps else float("nan")
    return {"losses": losses, "step_s": seconds, "cpu_s": statistics.median(cpu) if cpu else float("nan"),
            "loaded_rss": loaded, "peak_rss": proc_status("VmHWM"), "phases": phases.stop() if phases else None}


def row_args(row: str) -> list[str]:
    side, *switches = row.split("+")
    if side not in ("ours", "hf"):
        raise SystemExit(f"row {row!r}: must start with 'ours' or 'hf'")
    out = ["--side", side]
    for s in switches:
        if s.startswith("chunk") and s[5:].isdigit() and side == "ours":
            out += ["--chunk", s[5:]]
        elif s.startswith("qblock") and s[6:].isdigit() and side == "ours":
            out += ["--query-block", s[6:]]
        elif s in SWITCHES and (side == "ours" or s == "ckpt"):
            out.append(SWITCHES[s])
        else:
            raise SystemExit(f"row {row!r}: unknown switch {s!r} for {side}")
    return out


def run_row(row: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *row_args(row)]
    for name in ("seq", "batch", "steps", "warmup", "adamw", "lr", "seed", "hf_attn", "head_block", "threads"):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"row {row} failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {row:40s} step {record['step_s']:6.2f} s  cpu {record['cpu_s']:6.2f} s  "
          f"peak {record['peak_rss'] / 2**30:5.2f} GiB  load average {os.getloadavg()[0]:.2f}", flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per process (>= 1; the first loss is compared)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes for the hf row and the headline row")
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, help="rows besides hf and the headline")
    ap.add_argument("--headline", default=HEADLINE)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--adamw", choices=["fused", "foreach", "forloop"], default="fused")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--head-block", type=int, default=16384, help="vocabulary rows per head block (+tied)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each row (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    one = ap.add_argument_group("one side in this process (what each row runs)")
    one.add_argument("--side", choices=["ours", "hf"])
    one.add_argument("--chunk", type=int, default=1024)
    one.add_argument("--query-block", type=int, default=0, help="posttrain.model.ATTENTION_QUERY_BLOCK (0: as is)")
    for name in SWITCHES.values():
        one.add_argument(name, action="store_true")
    one.add_argument("--phases", action="store_true", help="also report the peak RSS of each phase of the step")
    one.add_argument("--profile", type=int, default=0, help="profile one step, print the top N ops (stderr)")
    args = ap.parse_args()

    if args.side:
        print(json.dumps(run_side(args)))
        return

    repeated = ["hf", args.headline]
    others = [r for r in dict.fromkeys(args.rows) if r not in repeated]
    for row in repeated + others:
        row_args(row)  # fail on a bad row before running anything
    order = [r for i in range(args.rounds) for r in repeated + (others if i == 0 else [])]
    print(f"Gemma 3 270M train step, float32, batch {args.batch} x {args.seq} tokens, AdamW ({args.adamw}, "
          f"lr {args.lr}), {args.threads or torch.get_num_threads()} threads, {args.warmup} warm-up + "
          f"{args.steps} timed steps per process; load average {os.getloadavg()[0]:.2f} at start")
    records: dict[str, list[dict]] = {}
    for row in order:
        records.setdefault(row, []).append(run_row(row, args))

    ref = records["hf"][0]["losses"][0]
    for row, recs in records.items():
        for rec in recs:
            assert abs(rec["losses"][0] - ref) < 1e-3, \
                f"{row}: first-step loss {rec['losses'][0]:.6f} differs from transformers' {ref:.6f}"

    def summary(row):
        recs = records[row]
        med = lambda f: statistics.median(f(r) for r in recs)
        return (med(lambda r: r["step_s"]), med(lambda r: r["cpu_s"]), med(lambda r: r["peak_rss"]),
                med(lambda r: r["peak_rss"] - r["loaded_rss"]), recs[0]["losses"][0], len(recs))

    tokens = args.batch * args.seq
    hf_step, hf_cpu, hf_peak, hf_rise, *_ = summary("hf")
    print(f"load average {os.getloadavg()[0]:.2f} at end. x hf: ours / transformers. tok/s: wall clock; "
          f"cpu-s: process CPU seconds per step (user + sys, all threads; steadier than wall time under "
          f"load with --threads 1); peak: whole-process peak RSS; rise: peak over the loaded model; GiB = 2^30 B")
    width = max(len(r) for r in records)
    head = (f"{'row':{width}s} {'tok/s':>6s} {'x hf':>6s} {'cpu-s':>6s} {'x hf':>6s} {'peak GiB':>9s} {'x hf':>6s} "
            f"{'rise GiB':>9s} {'x hf':>6s} {'step-1 loss':>12s} {'procs':>5s}")
    print(head + "\n" + "-" * len(head))
    for row in ["hf", *others, args.headline]:
        step, cpu, peak, rise, loss, n = summary(row)
        print(f"{row:{width}s} {tokens / step:6.1f} {hf_step / step:5.2f}x {cpu:6.1f} {hf_cpu / cpu:5.2f}x "
              f"{peak / 2**30:9.2f} {peak / hf_peak:5.2f}x {rise / 2**30:9.2f} {rise / hf_rise:5.2f}x "
              f"{loss:12.6f} {n:5d}")
    step, _, peak, *_ = summary(args.headline)
    speed, mem = hf_step / step, peak / hf_peak
    print(f"headline {args.headline}: {speed:.3f}x transformers' tokens/s (target >= 1.3x: "
          f"{'met' if speed >= 1.3 else 'NOT met'}), {mem:.3f}x its peak RSS (target <= 0.5x: "
          f"{'met' if mem <= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
