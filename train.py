"""Post-train a Gemma 3 model: config -> distill -> warm -> policy -> qat -> export.

    python train.py recipe=demo                                   # one process (CPU demo, real 270M)
    python train.py recipe=it_4b dry_run=true                     # plan: parameters, memory per device
    torchrun --nproc_per_node=2 train.py recipe=smoke             # 2 ranks on one machine (gloo on CPU)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        train.py recipe=it_27b model.student.source=/ckpt/gemma-3-27b-pt    # on every node
    python train.py --help                                        # every key, its default and meaning

Arguments are `recipe=NAME` (recipes/NAME.yaml, or a path to a .yaml file) and dotted
`key=value` overrides, e.g. `distill.lr=1e-5 tracking.tags=[a,b] model.teacher=null`.
Mistakes in them print one `error: ...` line per problem (no traceback) and exit with status 2.
`--debug` (or POSTTRAIN_DEBUG=1) shows the traceback too. One run at a time per <run_dir>/<name>:
a second one is refused while the first lives (a killed run's lock is free again).

The resolved config is printed once and saved to <run_dir>/<name>/resolved_config.yaml; each
stage writes <run_dir>/<name>/<stage>/ and, with resume=true, continues from its newest checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from posttrain.checkpoint import load_model, save_pretrained
from posttrain.config import Config, ModelSpec
from posttrain.recipe import describe_keys, load_config, print_config, save_config
from posttrain.runlock import RunLock
from posttrain.embedded import EMBEDDED_NAME
from posttrain.errors import Preempted, UserError
from posttrain.model import Gemma3, add_vision, build_model, param_counts, prune_layers
from posttrain.plan import check_arch, kept_layers, plan, with_vision
from posttrain.sampler import Sampler
from posttrain.seeds import derive_seed
from posttrain.summary import summary_rows, summary_table

RANK = int(os.environ.get("RANK", "0"))


def log(*args) -> None:
    """Print on rank 0 only, so a multi-process run reads like a single one."""
    if RANK == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- models

def load(role: str, spec: ModelSpec, seed: int, device: str, vision_seed: int = 0) -> Gemma3:
    """A model from its spec: the source's weights, or a random init of the preset (+ arch); a new vision
    tower (model.<role>.vision) is initialised from vision_seed, the same for every role."""
    dtype = getattr(torch, spec.dtype)
    if spec.source is None:
        model = build_model(spec.preset_config(), device=device, dtype=dtype, seed=seed).eval()
        origin = f"random init of preset {spec.preset}"
    else:
        model = load_model(spec.source, dtype=dtype, device=device)
        check_arch(role, spec, model.config)
        origin = spec.source
    if spec.layers:
        kept_layers(role, spec, model.config)  # a clear error for a bad list
        model, origin = prune_layers(model, spec.layers), origin + f", layers {spec.layers} kept"
    if spec.vision is not None:
        arch = with_vision(role, spec, model.config)  # a clear error for a model that already sees
        model = add_vision(model, arch.vision, vision_seed)
        origin += ", new vision tower (random init)"
    counts = param_counts(model.config)
    log(f"{role}: {counts['total'] / 1e6:,.1f}M parameters ({counts['non_embedding'] / 1e6:,.1f}M "
        f"non-embedding), {spec.dtype}, from {origin}")
    return model


def tokenizer_source(cfg: Config) -> str:
    # All Gemma 3 sizes share one tokenizer, so a preset-only (random) model uses the embedded one.
    return cfg.model.tokenizer or cfg.model.student.source or EMBEDDED_NAME


def smoke_eval(model: Gemma3, tok, prompts: list[str], max_new_tokens: int = 16) -> None:
    """Greedy replies to the recipe's eval_prompts, in one batch through the KV-cached sampler."""
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True).ids
           for p in prompts]
    t0 = time.perf_counter()
    out = Sampler(model).generate(ids, max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=tok.stop_ids)
    for prompt, (reply,) in zip(prompts, out):
        log(f"  {prompt!r} -> {tok.decode(reply.tokens, skip_special_tokens=True)!r} ({len(reply.tokens)} tokens)")
    log(f"  ({time.perf_counter() - t0:.1f}s)")


# ----------------------------------------------------------------------------- stages

def distill(cfg: Config, models: dict, tok) -> None:
    """SFT on the teacher's distribution (posttrain/stages/distill.py); the next stages get the trained student."""
    from posttrain.stages.distill import run_distill

    result = run_distill(cfg, models["student"], models.pop("teacher"), tok)  # the teacher's memory goes with it
    models.setdefault("summaries", {})["distill"] = result.summary
    models["student"] = load_model(result.final, dtype=getattr(torch, cfg.model.student.dtype))
    log(f"student <- {result.final}")


def warm(cfg: Config, models: dict, tok) -> None:
    """Reward models from the student, weight-averaged (posttrain/stages/warm.py); the policy stage reads it."""
    from posttrain.stages.warm import run_warm

    result = run_warm(cfg, models["student"], tok)
    models.setdefault("summaries", {})["warm"] = result.summary
    models["reward_model"] = result.final
    log(f"reward model -> {result.final}")


def policy(cfg: Config, models: dict, tok) -> None:
    """J-BOND and/or WARP on the student (posttrain/stages/policy.py); the next stages get the trained policy."""
    from posttrain.stages.policy import run_policy

    rm = models.get("reward_model") or cfg.out_dir / "warm" / "reward_model"
    result = run_policy(cfg, models["student"], tok, rm if Path(rm).exists() else None)
    models.setdefault("summaries", {})["policy"] = result.summary
    models["student"] = load_model(result.final, dtype=getattr(torch, cfg.model.student.dtype))
    log(f"student <- {result.final}")


def qat(cfg: Config, models: dict, tok) -> None:
    """Quantization-aware training (posttrain/stages/qat.py); the next stages get the quantized student."""
    from posttrain.stages.qat import run_qat

    teacher = models.pop("teacher", None) if cfg.qat.teacher == "model.teacher" else None
    result = run_qat(cfg, models["student"], tok, teacher)
    models.setdefault("summaries", {})["qat"] = result.summary
    models["student"] = load_model(result.final, dtype=getattr(torch, cfg.model.student.dtype))  # quantized values
    log(f"student <- {result.final} ({cfg.qat.format} values)")


def export(cfg: Config, models: dict, tok) -> None:
    """The student as an HF directory (config.json, safetensors, tokenizer) transformers loads."""
    out = Path(cfg.export.dir) if cfg.export.dir else cfg.out_dir / "export"
    if RANK == 0:
        save_pretrained(models["student"], tok, out, dtype=getattr(torch, cfg.export.dtype))
    log(f"exported the student to {out} ({cfg.export.dtype})")


# Each stage takes (cfg, models, tokenizer) and writes <run_dir>/<name>/<stage>/.
STAGES = {
    "distill": distill,  # posttrain/stages/distill.py
    "warm": warm,  # posttrain/stages/warm.py
    "policy": policy,  # posttrain/stages/policy.py (bond.py, warp.py, merge.py)
    "qat": qat,  # posttrain/stages/qat.py (quant.py, gguf_export.py, int4_export.py)
    "export": export,
}


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        print("keys (type = default): description\n" + describe_keys())
        return 0
    debug = "--debug" in argv or os.environ.get("POSTTRAIN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return run(argv)
    except Preempted as e:  # the checkpoint is written: exit 0, so a scheduler requeues the job
        if RANK == 0:
            print(f"\n{e}", flush=True)
        return 0
    except UserError as e:
        if debug:  # --debug or POSTTRAIN_DEBUG=1: the traceback as well
            raise
        # Every rank meets the same error (stages decide together): one report per node.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr, flush=True)
        else:  # let local rank 0 print first: the launcher stops the other ranks once one has exited
            time.sleep(2.0)
        return 2


def run(argv: list[str]) -> int:
    # 1. config: recipe + overrides, printed once and saved with the run
    cfg = load_config(argv)
    # one run per <run_dir>/<name>: rank 0 holds its lock until the process ends (posttrain/runlock.py)
    lock = RunLock.acquire(cfg.out_dir) if RANK == 0 else None
    try:
        return run_locked(cfg)
    finally:
        if lock is not None:
            lock.release()


def run_locked(cfg: Config) -> int:
    if RANK == 0:
        print_config(cfg)
        log(f"saved {save_config(cfg)}")

    # 2. dry run: what would run, on what, in how much memory; no weights read. Names nothing answers
    # to (rewards, datasets, model sources) stop a real run here, before any weights load, and make a
    # dry run exit 2 after its plan; a stage without its data is a note in the plan.
    unresolved = cfg.unresolved()
    if cfg.dry_run:
        log("\n" + plan(cfg).format())
        if unresolved:
            raise UserError("\n".join(unresolved))
        return 0
    if problems := cfg.missing_data() + unresolved:
        raise UserError("\n".join(problems))
    from posttrain.sequence_parallel import check_trainable

    check_trainable(cfg)  # before any weights load

    # 3. process group (torchrun's, or a world of one), models and tokenizer
    from posttrain.engine import init_distributed

    init_distributed()
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from posttrain.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_source(cfg))
    eyes = derive_seed(cfg.seed, "vision tower")
    models = {"student": load("student", cfg.model.student, cfg.seed, device, eyes)}
    if cfg.model.teacher is not None:
        models["teacher"] = load("teacher", cfg.model.teacher, derive_seed(cfg.seed, "teacher_init"), device, eyes)
    for role, model in models.items():
        if model.config.vocab_size < tok.vocab_size:
            raise UserError(f"model.{role} has {model.config.vocab_size} embedding rows but the tokenizer "
                            f"({tok.source}) has {tok.vocab_size} pieces; fix: use a Gemma 3 vocabulary "
                            f"(do not shrink vocab_size in model.{role}.arch)")
    if cfg.data.eval_prompts:
        log("smoke evaluation (student, greedy):")
        smoke_eval(models["student"], tok, cfg.data.eval_prompts)

    # 4. stages, in pipeline order
    for name in cfg.stages:
        log(f"\n== stage {name}")
        STAGES[name](cfg, models, tok)
    summaries = models.get("summaries", {})
    if summaries:
        if table := summary_table(summary_rows(summaries)):
            log("\n" + table)
        if RANK == 0:
            from posttrain.engine import write_json_atomic

            write_json_atomic(cfg.out_dir / "summary.json", summaries)
    log(f"\ndone: {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
