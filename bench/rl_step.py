"""One RL policy step on the real Gemma 3 270M: ours (WARP's REINFORCE step, J-BOND) vs TRL's GRPOTrainer.

    pip install trl==1.16.0          # the peer: a bench-only extra, never imported by the library
    python bench/rl_step.py [--steps 4] [--sides warp trl] [--ckpt] [--threads N]

Both sides: float32 on CPU, the same 8 chat prompts (arithmetic problems, our chat template and
TRL's apply the same Gemma 3 template), 4 samples each at temperature 1 (no top-k/top-p), at most
64 new tokens, stop at <eos> or <end_of_turn>, AdamW at lr 1e-6 (betas 0.9/0.999, eps 1e-8, no
weight decay), no gradient clipping, every parameter trained (the tied embedding too), a trivial
reward (the completion's length in characters / 100; its cost is nil on both sides).
- ours: `policy_warp.warp_step` (rollout from our sampler, the EMA anchor's no-grad log-probs,
  the REINFORCE loss with the KL-regularised reward, backward, DeepSpeed step at ZeRO 0, the EMA
  update) or `policy.bond_step` (J-BOND: also 4 anchor samples per prompt, best-of-n), called
  directly, one step after another (no checkpoints or evaluation);
- TRL: `GRPOTrainer` with beta 0.1 (a reference model, as our anchor), num_generations 4,
  per-device batch 32 completions, one generation per step, `use_cpu=True`, no logging/saving.

Each side runs in its own subprocess (`--side NAME`), so memory is per side: peak RSS of the whole
process (VmHWM), and RSS peaks per phase sampled every 5 ms. Times are medians over the steps
after the first (a warm-up): the full step and its phases, rollout, reference (no-grad) log-probs,
loss forward, backward, optimizer. Ours also reports the rollout's tokens/s against our bare
sampler (`Sampler.generate`, as bench/sampler.py calls it) on the same prompts, batch and
settings in the same process: what the stage adds to sampling. The machine is shared: quote the
ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

# bench/ goes last: python puts a script's folder first, and bench/rewards.py would hide the rewards package
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from train_step import proc_status  # noqa: E402

PROMPTS = [f"What is {a} + {b}? Show your working, then give the answer." for a, b in
           [(27, 45), (38, 19), (64, 27), (15, 86), (73, 48), (52, 39), (91, 17), (26, 58)]]
SAMPLES, NEW_TOKENS, LR, BETA = 4, 64, 1e-6, 0.1


def length_reward(prompts, completions, **_):
    """Characters / 100. TRL passes a chat prompt's completions as messages, ours as text."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 100 for c in completions]


class Phases:
    """Wall time and peak RSS per phase and per step (RSS sampled every 5 ms by a thread); `step()`
    opens a new step's record. The summary reads the steps after the first: the warm-up step also
    creates the optimizer's states, a one-off."""

    def __init__(self):
        self.steps: list[dict] = []
        self.peaks: list[dict] = [{}]
        self.current, self._stop = "idle", False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop:
            peaks = self.peaks[-1]
            peaks[self.current] = max(peaks.get(self.current, 0), proc_status("VmRSS"))
            time.sleep(0.005)

    def step(self) -> None:
        self.steps.append({})
        self.peaks.append({})

    @contextlib.contextmanager
    def phase(self, name: str):
        outer, self.current = self.current, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            rec = self.steps[-1] if self.steps else {}
            rec[name] = rec.get(name, 0.0) + time.perf_counter() - t0
            self.current = outer

    def wrap(self, owner, attr: str, name: str, when=None):
        real = getattr(owner, attr)

        def timed(*args, **kwargs):
            if when is not None and not when(*args, **kwargs):
                return real(*args, **kwargs)
            with self.phase(name):
                return real(*args, **kwargs)

        setattr(owner, attr, timed)

    def summary(self) -> dict:
        self._stop = True
        self._thread.join()
        timed, peaks = (self.steps[1:], self.peaks[2:]) if len(self.steps) > 1 else (self.steps, self.peaks[1:])
        keys = sorted({k for s in timed for k in s})
        names = sorted({k for p in peaks for k in p})
        return {"seconds": {k: statistics.median(s.get(k, 0.0) for s in timed) for k in keys},
                "rss_peaks": {k: max(p.get(k, 0) for p in peaks) for k in names},
                "peak_rss": proc_status("VmHWM"), "steps": len(self.steps)}


# ----------------------------------------------------------------------------- ours

def run_ours(args) -> dict:
    import posttrain.stages.policy as policy
    import posttrain.stages.policy_warp as policy_warp
    import posttrain.stages.rl as rl
    from posttrain.checkpoint import load_model
    from posttrain.engine import Engine, init_distributed
    from posttrain.recipe import load_config
    from posttrain.sampler import Sampler
    from posttrain.tokenizer import load_tokenizer
    from rewards.base import CombinedReward

    overrides = [
        "recipe=demo", "distributed.zero_stage=0", "model.freeze_embeddings=false", "distributed.grad_clip=0.0",
        f"distributed.activation_checkpointing={str(args.ckpt).lower()}", "distributed.weight_decay=0.0",
        "data.micro_batch_size=8", f"policy.samples_per_prompt={SAMPLES}",
        f"policy.max_new_tokens={NEW_TOKENS}", "policy.temperature=1.0", f"policy.lr={LR}", "policy.warmup_steps=0",
        "policy.stop=[]", f"policy.warp_beta={BETA}", "policy.tie_break=half",
        f"policy.rows_per_pass={0 if args.side.endswith('_one_pass') else args.rows_per_pass}",
        f"run_dir={args.tmp}",
    ]
    cfg = load_config(overrides)
    from posttrain.checkpoint import embedded_hf_dir

    init_distributed()  # a world of one
    path = embedded_hf_dir()
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32)
    rows = [{"prompt": p} for p in PROMPTS]
    prompts = rl.Prompts(rows, tok, "bench prompts")
    idx = list(range(len(rows)))
    reward = CombinedReward([("length", length_reward, 1.0, 600.0, "raise")])
    engine = Engine(model, cfg, lr=LR, steps=args.steps, warmup_steps=0, out_dir=Path(args.tmp) / "ours",
                    grad_accum=rl.loss_passes(cfg, SAMPLES + 1 if args.side.startswith("bond") else SAMPLES))
    anchor = rl.Anchor(engine)
    ph = Phases()
    tokens: list[int] = []
    real_rollout = rl.rollout

    def counted_rollout(*a, **k):
        out = real_rollout(*a, **k)
        tokens.append(sum(len(c) for row in out for c in row))
        return out

    for mod in (policy, policy_warp):
        mod.rollout = counted_rollout
        ph.wrap(mod, "rollout", "rollout")
        ph.wrap(mod, "seq_logprobs", "reference")
        ph.wrap(mod, "score", "reward")
    # linear_loss_step's passes call rl._completion_forward (their fused head computes its gradients
    # there: the head's share of backward is timed as loss_forward); the reference's call is inside its phase
    ph.wrap(rl, "_completion_forward", "loss_forward", when=lambda *a, **k: ph.current != "reference")
    ph.wrap(Engine, "backward", "backward")
    ph.wrap(Engine, "step", "optimizer")
    ph.wrap(rl.Anchor, "update", "anchor_update")
    step_fn = policy.bond_step if args.side.startswith("bond") else policy_warp.warp_step
    out_passes = rl.loss_passes(cfg, SAMPLES + 1 if args.side.startswith("bond") else SAMPLES)
    totals = []
    for step in range(args.steps):
        ph.step()
        t0 = time.perf_counter()
        with ph.phase("step"):
            step_fn(engine, anchor, prompts, idx, reward, cfg, tok, seed=step)
        totals.append(time.perf_counter() - t0)
        print(f"  {args.side} step {step}: {totals[-1]:.1f} s", file=sys.stderr, flush=True)
    bare = []
    with ph.phase("bare_sampler"):
        stop = rl.stop_ids(cfg, tok)
        sampler = Sampler(engine.model.eval())
        for seed in range(3):
            t0 = time.perf_counter()
            comps = sampler.generate([prompts.ids[i] for i in idx], n=SAMPLES, max_new_tokens=NEW_TOKENS,
                                     temperature=1.0, stop_token_ids=stop, seed=seed)
            bare.append((sum(len(c.tokens) for row in comps for c in row), time.perf_counter() - t0))
    out = ph.summary()
    out["bare_sampler_tok_s"] = statistics.median(n / s for n, s in bare)
    rollouts_per_step = 2 if args.side.startswith("bond") else 1
    steady = [t for i, t in enumerate(tokens) if i // rollouts_per_step > 0] or tokens
    out["rollout_tokens"] = statistics.median(steady) * rollouts_per_step

    out["torch_threads"] = torch.get_num_threads()
    out["loss_passes"] = out_passes
    return out


# ----------------------------------------------------------------------------- TRL

def run_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, Gemma3ForCausalLM, TrainerCallback

    from posttrain.checkpoint import embedded_hf_dir

    path = embedded_hf_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS] * (args.steps + 1))
    conf = trl.GRPOConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=len(PROMPTS) * SAMPLES,
        num_generations=SAMPLES, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        beta=BETA, max_steps=args.steps, use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", logging_steps=10_000, gradient_checkpointing=args.ckpt, shuffle_dataset=False,
        dataloader_num_workers=0, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=length_reward, args=conf, train_dataset=data,
                              processing_class=tok)
    ph = Phases()
    ph.wrap(trainer, "_generate", "rollout")
    ph.wrap(trainer, "_get_per_token_logps_and_entropies", "reference",
            when=lambda *a, **k: not torch.is_grad_enabled())
    ph.wrap(trainer, "_get_per_token_logps_and_entropies", "loss_forward",
            when=lambda *a, **k: torch.is_grad_enabled())
    ph.wrap(trainer.accelerator, "backward", "backward")
    tokens: list[int] = []
    real_generate = trainer._generate

    def counted(prompts):
        out = real_generate(prompts)
        tokens.append(sum(len(c) for c in out[1]))  # (prompt_ids, completion_ids, ...)
        return out
    trainer._generate = counted

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            ph.step()
            self.t0 = time.perf_counter()
            ph.current = "step"

        def on_pre_optimizer_step(self, *a, **k):
            self.t_opt = time.perf_counter()
            ph.current = "optimizer"

        def on_optimizer_step(self, *a, **k):
            ph.steps[-1]["optimizer"] = time.perf_counter() - self.t_opt
            ph.current = "step"

        def on_step_end(self, *a, **k):
            ph.steps[-1]["step"] = time.perf_counter() - self.t0
            ph.current = "idle"
            print(f"  trl step {len(ph.steps) - 1}: {ph.steps[-1]['step']:.1f} s", file=sys.stderr, flush=True)

    trainer.add_callback(StepTimes())
    trainer.train()
    out = ph.summary()
    out["rollout_tokens"] = statistics.median(tokens[1:] or tokens)
    out["trl"] = trl.__version__
    out["torch_threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------- driver

PHASES = ["step", "rollout", "reference", "loss_forward", "backward", "optimizer", "anchor_update", "reward"]


def table(results: dict) -> None:
    sides = list(results)
    peer = "trl" if "trl" in results else None
    head = " | ".join(sides)
    ratios = [s for s in sides if s != "trl" and peer]
    print(f"| phase (s, median) | {head} |" + "".join(f" TRL / {s} |" for s in ratios))
    print("|---" * (1 + len(sides) + len(ratios)) + "|")
    for name in PHASES:
        vals = [results[s]["seconds"].get(name) for s in sides]
        if all(v is None for v in vals):
            continue
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
        rs = "".join(f" {results['trl']['seconds'][name] / results[s]['seconds'][name]:.2f}x |"
                     if results[s]["seconds"].get(name) and name in results["trl"]["seconds"] else " - |"
                     for s in ratios)
        print(f"| {name} | {cells} |{rs}")
    for key, what in (("steady", "peak RSS, steps 2+ (GB)"), ("peak_rss", "peak RSS, whole process (GB)")):
        cells = " | ".join(f"{results[s][key] / 1e9:.2f}" for s in sides)
        rs = "".join(f" ours {results[s][key] / results['trl'][key]:.2f}x |" for s in ratios)
        print(f"| {what} | {cells} |{rs}")
    for s in sides:
        r = results[s]
        tps = r["rollout_tokens"] / r["seconds"]["rollout"]
        line = f"{s}: rollout {r['rollout_tokens']:.0f} tokens, {tps:.1f} tok/s" + (f", loss in {r['loss_passes']} passes" if "loss_passes" in r else "")
        if "bare_sampler_tok_s" in r:
            line += f"; bare sampler {r['bare_sampler_tok_s']:.1f} tok/s (stage / bare {tps / r['bare_sampler_tok_s']:.2f})"
        peaks = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(r["rss_peaks"].items(), key=lambda kv: -kv[1]))
        print(line + f"; threads {r['torch_threads']}\n  RSS peaks per phase (GB): {peaks}")
    if "trl" in results:
        print(f"TRL {results['trl']['trl']}. Not matched: TRL's rollout pads the prompts (left) and runs "
              "transformers `generate`; its loss is GRPO's (token-level, a k3 KL term to the reference) where "
              "ours is WARP's REINFORCE on a KL-shaped reward or J-BOND's; TRL's reference is a second whole "
              "model, ours an EMA anchor swapped into the policy's weights.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="steps per side; the first is a warm-up")
    ap.add_argument("--sides", nargs="+", default=["warp", "bond", "trl"],
                    choices=["warp", "bond", "trl", "warp_one_pass", "bond_one_pass"],
                    help="*_one_pass: ours with policy.rows_per_pass=0 (the whole batch's loss in one pass)")
    ap.add_argument("--rows-per-pass", type=int, default=8, help="policy.rows_per_pass of ours (the default)")
    ap.add_argument("--save", default="runs/rl_step_results.json", help="each side's record, written as it ends")
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing on both sides")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="runs/bench_rl_step", help="scratch directory (deleted after)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        result = run_trl(args) if args.side == "trl" else run_ours(args)
        result["steady"] = max(v for k, v in result["rss_peaks"].items() if k != "bare_sampler")
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in args.sides:
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--tmp", args.tmp,
               "--threads", str(args.threads), "--rows-per-pass", str(args.rows_per_pass)] + \
            (["--ckpt"] if args.ckpt else [])
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"side {side} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}", file=sys.stderr)
            continue
        results[side] = json.loads(line[-1][7:])
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(results, indent=1))
    subprocess.run(["rm", "-rf", args.tmp])
    print(f"conditions: float32, CPU, {len(PROMPTS)} prompts x {SAMPLES} samples, <= {NEW_TOKENS} new tokens, "
          f"temperature 1, AdamW lr {LR}, beta {BETA}, checkpointing {'on' if args.ckpt else 'off'}, "
          f"{args.steps} steps (median of the last {args.steps - 1})")
    table(results)


if __name__ == "__main__":
    main()
