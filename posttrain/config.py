"""The run configuration: a typed schema with a description on every key.

Recipe files and `key=value` overrides are turned into a Config by recipe.py (`load_config`).

Validation is strict, in the spirit of torchtune's config checks: unknown keys fail with the
closest known key, a string never passes for a number, and every error is a `UserError` that
names the key, where it came from, the rule and the fix. `python train.py --help` lists every
key with its type, default and description (`describe_keys()`).

Design choice: `stages` is the only switch for what runs. There are no per-section `enabled`
flags, which would be a second source of truth; drop a stage from the list to skip it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .embedded import EMBEDDED_NAME
from .errors import UserError
from .model import PRESETS, GemmaConfig


def _recipes_dir() -> Path:
    """posttrain/recipes/ in an installed copy (pyproject.toml ships recipes/ there as the package
    posttrain.recipes), else the checkout's recipes/ (python train.py in it, or an editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


RECIPES_DIR = _recipes_dir()
STAGE_ORDER = ("distill", "warm", "policy", "qat", "export")

PresetName = Literal[tuple(PRESETS)]  # "270m", "1b", "4b", "12b", "27b"
Dtype = Literal["float32", "bfloat16"]
Stage = Literal[STAGE_ORDER]


class Section(BaseModel):
    # strict: "10" is not an int and true is not a number (an int for a float is fine);
    # extra="forbid": a misspelled key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _default_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"environment variable WORLD_SIZE={value!r} is not a positive integer; fix: unset it")
    return int(value)


# ----------------------------------------------------------------------------- schema

class ModelSpec(Section):
    source: Optional[str] = Field(
        None, description=f"weights to load: an HF model directory, a .gguf file, or '{EMBEDDED_NAME}' "
        "(the embedded Gemma 3 270M); null = random init of `preset`")
    preset: Optional[PresetName] = Field(
        None, description="architecture name (270m, 1b, 4b, 12b, 27b); with a source, the checkpoint "
        "must match it; without one, the model is randomly initialised")
    arch: dict[str, Any] = Field(
        default_factory=dict, description="changes to the preset's architecture, e.g. {num_layers: 2, "
        "hidden_size: 64} for tiny test models; keys are posttrain.model.GemmaConfig fields")
    dtype: Dtype = Field("float32", description="weights and compute dtype; bfloat16 on GPU (DeepSpeed "
                         "keeps float32 master weights for trained models), float32 on CPU")
    vision: Optional[dict[str, Any]] = Field(
        None, description="give a text-only model eyes: a new, randomly initialised vision tower and projector "
        "with these posttrain.vision.VisionConfig fields (e.g. {hidden_size: 128, num_layers: 2, num_heads: 2, "
        "intermediate_size: 256, image_size: 64, patch_size: 8, mm_tokens_per_image: 16}; {} = SigLIP "
        "so400m). Seeded by the recipe's seed, so student and teacher get the same tower. Not allowed on a "
        "model that already has one")
    layers: Optional[list[int]] = Field(
        None, description="keep only these layers (0-based, ascending) of the loaded model: a smaller "
        "student initialised from a larger model's layers, each keeping its type (sliding or global)")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.source is None and self.preset is None:
            raise ValueError("set source (HF directory, .gguf file or 'gemma3-270m') or preset "
                             f"({', '.join(PRESETS)}), or both")
        if self.arch and self.preset is None:
            raise ValueError("arch changes a preset's architecture and needs preset set; with only a "
                             "source the architecture comes from the checkpoint")
        fields = {f.name: f for f in dataclasses.fields(GemmaConfig) if f.name not in ("layer_types", "vision")}
        for key, value in self.arch.items():
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(fields)}"
                raise ValueError(f"arch has unknown field '{key}'{hint}")
            wants_int = fields[key].type in (int, "int")
            ok = isinstance(value, int) if wants_int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                raise ValueError(f"arch.{key} must be {'an integer' if wants_int else 'a number'}, got {value!r}")
        if self.vision is not None:
            from .vision import VisionConfig

            known = {f.name for f in dataclasses.fields(VisionConfig)}
            if bad := sorted(set(self.vision) - known):
                raise ValueError(f"vision has unknown fields {bad}; known: {', '.join(sorted(known))}")
            try:
                VisionConfig(**self.vision)
            except (TypeError, ValueError) as e:
                raise ValueError(f"vision gives {e}") from None
        if self.arch:
            try:
                self.preset_config()
            except ValueError as e:  # GemmaConfig's own checks, e.g. heads divisible by kv heads
                raise ValueError(f"arch gives {e}") from None
        return self

    def preset_config(self) -> GemmaConfig | None:
        """The preset with `arch` applied, or None without a preset."""
        if self.preset is None:
            return None
        return PRESETS[self.preset].with_(**self.arch) if self.arch else PRESETS[self.preset]


class ModelSection(Section):
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(source=EMBEDDED_NAME),
                               description="the model being post-trained (and the policy of the RL stages)")
    teacher: Optional[ModelSpec] = Field(
        None, description="distillation teacher, frozen; null when there is no distill stage")
    tokenizer: Optional[str] = Field(
        None, description="tokenizer source (HF directory, .gguf, or 'gemma3-270m'); null = the student's "
        "source, else the embedded Gemma 3 tokenizer (all Gemma 3 sizes share it)")
    freeze_embeddings: bool = Field(
        False, description="keep the student's tied embedding (which is also its output head) as loaded in "
        "every trained stage (distill, warm's reward models, policy): no gradient, no Adam state, nothing "
        "to all-reduce for it. On the 270M that is 168M of its 268M parameters")
    train_vision_tower: bool = Field(
        False, description="multimodal models: train the SigLIP vision tower too. Off by default, as in the "
        "Gemma 3 report (section 2.1: the encoder is frozen); the tower then stays bit-identical through "
        "every stage and the export")
    train_projector: bool = Field(
        False, description="multimodal models: train the projector that maps the tower's output into the text "
        "model (its RMSNorm and its matrix); off: frozen, bit-identical like the tower")


class DistributedSection(Section):
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 replicates everything, 1 "
                            "shards optimizer states, 2 also gradients, 3 also weights")
    world_size: int = Field(default_factory=_default_world_size, ge=1, description="devices to plan for "
                            "(memory estimate of the dry run); default: $WORLD_SIZE, else 1. The real "
                            "run uses the process group torchrun gives it")
    nodes: int = Field(1, ge=1, description="machines in the planned job (world_size / nodes devices each)")
    sequence_parallel: int = Field(1, ge=1, description="Ulysses sequence parallelism: split each sequence "
                                   "over this many ranks (attention all-to-alls heads for tokens); must divide "
                                   "the world size. 1 turns it off")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: keep optimizer states (and the "
                                    "update) in CPU memory; needs zero_stage >= 1")
    activation_checkpointing: bool = Field(False, description="recompute each block in the backward pass: "
                                           "activation memory of one layer instead of all, ~30% more compute")
    autocast: Literal["off", "bf16"] = Field("off", description="bf16 autocast of the trained model's forward "
                                             "over float32 weights (mixed precision). On GPU the usual choice "
                                             "with model.student.dtype=float32; on CPU it helps only where the "
                                             "CPU has bf16 matrix units (AMX), and costs elsewhere")
    compile: bool = Field(False, description="torch.compile each decoder block of the trained model (GPU: "
                          "about 2x the tokens/s of eager on the 270M, bench/train_step_cuda.py; the first "
                          "steps pay the compile)")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (DeepSpeed's "
                             "gradient_clipping; 0 turns clipping off), in every trained stage")
    adam_betas: list[float] = Field(default_factory=lambda: [0.9, 0.999],
                                    description="AdamW's [beta1, beta2], every trained stage")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay (0: none)")
    ds_config: dict[str, Any] = Field(default_factory=dict, description="extra DeepSpeed config, merged over "
                                      "the generated one (e.g. {zero_optimization: {overlap_comm: true}})")

    @field_validator("autocast", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` (autocast=off) as false

    @model_validator(mode="after")
    def _check(self) -> "DistributedSection":
        if self.world_size % self.nodes:
            raise ValueError(f"distributed.world_size ({self.world_size}) must be divisible by "
                             f"distributed.nodes ({self.nodes})")
        if self.world_size % self.sequence_parallel:
            raise ValueError(f"distributed.sequence_parallel ({self.sequence_parallel}) must divide "
                             f"distributed.world_size ({self.world_size}); e.g. sequence_parallel=2 on 2 or 4 ranks")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"distributed.adam_betas must be [beta1, beta2], each in [0, 1), got {self.adam_betas}; "
                             "fix: e.g. distributed.adam_betas=[0.9,0.999]")
        return self


class DataSection(Section):
    train: Optional[str] = Field(None, description="distillation data (prompts or chats): a .jsonl/.json/"
                                 ".parquet path, a bundled dataset name, or a hub dataset name")
    eval: Optional[str] = Field(None, description="held-out data for evaluation, same forms as `train`")
    preferences: Optional[str] = Field(None, description="WARM preference pairs (prompt, chosen, rejected)")
    eval_preferences: Optional[str] = Field(None, description="held-out preference pairs; null = a share "
                                            "(warm.eval_share) of data.preferences")
    prompts: Optional[str] = Field(None, description="policy-stage prompts with the columns their rewards need")
    eval_safety: Optional[str] = Field(None, description="held-out labelled safety prompts (a `prompt` and a "
                                       "boolean `harmful` per row, e.g. safety_prompts_eval): the policy stage "
                                       "reports refusals of the harmful ones and over-refusals of the benign ones, "
                                       "before and after")
    eval_prompts: list[str] = Field(default_factory=list, description="a few prompts whose greedy "
                                    "continuations are printed as a smoke evaluation")
    max_seq_len: int = Field(1024, ge=8, description="tokens per training sequence (prompt + reply)")
    micro_batch_size: int = Field(1, ge=1, description="sequences (prompts in the policy stage) per device per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    loss_chunk_tokens: int = Field(1024, ge=1, description="tokens per chunk of the vocabulary-sized "
                                   "losses; B x T x V logits are never materialised")
    packing: bool = Field(True, description="pack short examples into rows of max_seq_len (attention stays "
                          "within each example); false = one example per row, padded to the batch's longest")
    truncation: Literal["drop", "truncate"] = Field("drop", description="examples longer than max_seq_len: "
                                                    "drop them, or keep their first max_seq_len tokens")
    pan_and_scan: bool = Field(False, description="multimodal models: cut images whose aspect ratio is at "
                               "least 1.2 into 2-4 crops, each read as one more image after the original "
                               "(the Gemma 3 report's Pan & Scan; 256 more tokens per crop)")


class DistillSection(Section):
    method: Literal["sampled", "topk", "on_policy"] = Field(
        "sampled", description="sampled: Gemma 3 report, CE on `num_samples` ids drawn from the teacher "
        "and renormalised; topk: forward KL on the teacher's top_k ids; on_policy: student samples, "
        "teacher scores")
    num_samples: int = Field(256, ge=1, description="vocabulary ids sampled per token from the teacher (report: 256)")
    top_k: int = Field(256, ge=1, description="teacher ids kept per token for method=topk")
    teacher_context: Optional[str] = Field(
        None, description="context distillation: text (or a path to a .txt file) put before each prompt "
        "the teacher sees but not the student, e.g. worked examples")
    label_weight: float = Field(0.0, ge=0, le=1, description="method=sampled: share w of the data's own next "
                                "token in each target, loss = (1 - w) distillation + w cross-entropy on the "
                                "label (Hinton et al.'s soft/hard mix); 0 = the report's pure distillation. "
                                "Teaches what the teacher cannot, e.g. <end_of_turn> from a pretrained teacher")
    steps: int = Field(1000, ge=0, description="optimizer steps")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps, then cosine decay")
    temperature: float = Field(1.0, gt=0, description="teacher sampling temperature for the targets")
    cache_targets: bool = Field(False, description="precompute teacher targets to disk (ids int32 + probs "
                                "fp16) and stream them, so teacher and student never share memory")
    max_new_tokens: int = Field(64, ge=1, description="method=on_policy: length cap of the student's samples")
    eval_every: int = Field(50, ge=0, description="steps between held-out evaluations (teacher-student KL, "
                            "top-1 agreement on data.eval); 0 = only before and after")
    eval_batches: int = Field(8, ge=1, description="held-out batches per evaluation (per rank)")

    @model_validator(mode="after")
    def _check(self) -> "DistillSection":
        if self.label_weight > 0 and self.method != "sampled":
            raise ValueError(f"distill.label_weight={self.label_weight} needs method=sampled (got {self.method}: "
                             "topk targets are log-probs, on_policy labels are the student's own samples); "
                             "fix: set distill.method=sampled or distill.label_weight=0")
        return self


class QatSection(DistillSection):
    """Quantization-aware training (Gemma 3 report, section 2.3): the distill loop on a student whose
    linear weights are fake-quantized, taught by the float model's probabilities. Every distill key
    means the same here (the targets: sampled-256 by default)."""

    format: Literal["q4_0", "int4", "sfp8"] = Field(
        "q4_0", description="q4_0: llama.cpp blocks of 32 inputs, an fp16 scale each (4.5 bits/weight, the "
        "GGUF export); int4: one scale per output channel (the int4 safetensors export); sfp8: switched fp8, "
        "per channel")
    quantize_embedding: bool = Field(False, description="fake-quantize the tied embedding/head too (Google's "
                                     "files keep it in 16 bits, the default)")
    teacher: Literal["self", "model.teacher"] = Field(
        "self", description="self: the student's own float weights at the start of the stage (a frozen copy); "
        "model.teacher: the loaded teacher")
    snap: float = Field(0.05, ge=0, lt=1, description="before training, move each linear weight this fraction of "
                        "the way to its quantized value (the quantized start, PTQ, is unchanged): weights on a "
                        "rounding boundary then stop flipping at the first tiny step. 0 = off")
    export: bool = Field(True, description="write the quantized files beside the final model: model-q4_0.gguf "
                         "(format q4_0) or int4/ (format int4), with their sizes and bits per weight")
    steps: int = Field(5000, ge=0, description="optimizer steps (report: about 5,000)")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")


class WarmSection(Section):
    members: int = Field(6, ge=1, description="M reward models, averaged uniformly (paper: 6)")
    lrs: list[float] = Field(default_factory=lambda: [1e-5, 4e-5, 1e-4], min_length=1,
                             description="learning rates the members are spread over (paper: {1e-5, 4e-5, 1e-4})")
    dropouts: list[float] = Field(default_factory=lambda: [0.05, 0.1], min_length=1,
                                  description="dropout rates on the reward head's input the members are spread "
                                  "over (paper: {0.05, 0.1}; [0.0] keeps a probed head intact on small models)")
    probe_steps: int = Field(100, ge=0, description="linear-probing steps of the shared scalar head, "
                             "backbone frozen, before the members fork")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps of each member, then cosine "
                                     "decay; None: min(steps // 10, 50)")
    steps: int = Field(1000, ge=0, description="fine-tuning steps per member")
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin: loss = -log sigmoid(r_chosen - "
                          "r_rejected - margin)")
    probe_lr: float = Field(1e-3, gt=0, description="learning rate of the linear probe (the head alone, Adam)")
    eval_share: float = Field(0.1, gt=0, lt=1, description="share of data.preferences held out for evaluation "
                              "when data.eval_preferences is not set")
    label_noise: float = Field(0.0, ge=0, lt=0.5, description="share of training pairs whose labels are "
                               "flipped (the paper's robustness experiment: 0.25)")
    max_pairs: Optional[int] = Field(None, ge=2, description="use a seeded subset of at most this many pairs of "
                                     "data.preferences (before the held-out split); null = all")
    save_members: bool = Field(False, description="also save each member as a reward model directory "
                               "(member_<m>/reward_model)")

    @model_validator(mode="after")
    def _check(self) -> "WarmSection":
        if bad := [d for d in self.dropouts if not 0 <= d < 1]:
            raise ValueError(f"warm.dropouts must lie in [0, 1), got {bad}")
        if bad := [lr for lr in self.lrs if lr <= 0]:
            raise ValueError(f"warm.lrs must be positive, got {bad}")
        return self


def _data_problem(name: str) -> str | None:
    """Why a data source cannot load (a bundled name, a local file or directory, or a hub id), else None."""
    import data as bundled  # the repository's data/ package: bundled generators by name

    path = Path(name).expanduser()
    if name in bundled.BUNDLED or path.exists():
        return None
    if path.suffix in (".jsonl", ".json", ".parquet") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return (f"'{name}' does not exist; fix: give an existing .jsonl/.json/.parquet file or directory, or a "
                f"bundled name ({', '.join(sorted(bundled.BUNDLED))})")
    if "/" not in name:
        close = difflib.get_close_matches(name, list(bundled.BUNDLED), n=1)
        if close:
            return f"'{name}' is not a bundled dataset; did you mean '{close[0]}'? (a hub id is owner/name)"
    return None  # a hub dataset: loaded (and checked) when the stage starts


def _source_problem(source: str) -> str | None:
    if source == EMBEDDED_NAME or Path(source).expanduser().exists():
        return None
    return (f"'{source}' does not exist; fix: give an HF model directory, a .gguf file, or '{EMBEDDED_NAME}' "
            "(the embedded Gemma 3 270M)")


def _reward_problem(name: str, options: dict) -> str | None:
    """Why rewards.get(name, **options) would fail, found without building the reward."""
    from rewards.registry import check_spec

    try:
        check_spec(name, options)
    except UserError as e:
        return str(e)
    return None


class PolicySection(Section):
    algorithm: Literal["bond", "warp", "bond_then_warp"] = Field(
        "bond", description="bond: J-BOND; warp: WARP; bond_then_warp: J-BOND, then WARP from its result")
    steps: int = Field(1000, ge=0, description="optimizer steps of J-BOND, and of each WARP run per iteration")
    lr: float = Field(1e-6, gt=0, description="learning rate (AdamW)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps of J-BOND and of each WARP run, "
                                     "then cosine decay; None: min(steps // 10, 50)")
    max_new_tokens: int = Field(256, ge=1, description="rollout length cap")
    temperature: float = Field(1.0, ge=0, description="rollout sampling temperature (0 = greedy)")
    stop: list[str] = Field(default_factory=list, description="stop strings besides <end_of_turn> and <eos>, for "
                            "rollouts and evaluation: generation stops at the first token whose text contains one "
                            "(matched within a token, not across tokens), e.g. [\"\\n\"] for one-line answers")
    samples_per_prompt: int = Field(2, ge=2, description="policy completions per prompt (J-BOND's backward term, "
                                    "WARP's leave-one-out baseline)")
    rows_per_pass: int = Field(8, ge=0, description="completions per forward/backward pass of the policy's loss "
                               "(whole prompts' groups, at least one prompt's): the step's gradient is the same as "
                               "from one pass over all of them (the losses are linear in the sequence log-probs), "
                               "its activation memory that of this many rows; 0 = all rows in one pass")
    tie_break: Literal["half", "reward_model"] = Field(
        "half", description="J-BOND ties between rewards (0/1 verifiers): count as half a win, or break "
        "with the learned reward model's score")
    # J-BOND (BOND paper, section 5)
    beta: float = Field(0.5, ge=0, le=1, description="J-BOND mix: (1-beta) forward KL + beta backward KL")
    gamma: float = Field(0.0, ge=0, description="J-BOND weight of the extra KL(policy || anchor) term")
    eta: float = Field(0.02, ge=0, le=1, description="J-BOND anchor EMA: anchor <- (1-eta) anchor + eta policy")
    anchor_samples: int = Field(2, ge=2, description="J-BOND anchor samples per prompt (paper: 2); the "
                                "quantile of each policy sample is estimated from them")
    bon_n: int = Field(2, ge=2, description="J-BOND's N: the target is Best-of-N of the anchor (forward term: "
                       "SFT on the best of the first N anchor samples; backward term: (N-1) x the quantile "
                       "reward). Needs anchor_samples >= bon_n")
    quantile: Literal["jbond", "log"] = Field("jbond", description="J-BOND quantile reward: jbond = the paper's "
                                              "-log 16 when below every anchor sample, else 0 (2 samples); "
                                              "log = log of the empirical quantile (any number of samples)")
    eval_every: int = Field(0, ge=0, description="held-out evaluation (data.eval, the eval verifier) every N "
                            "steps; 0 = before and after only")
    eval_size: int = Field(64, ge=1, description="held-out prompts per evaluation (split over ranks)")
    eval_temperature: float = Field(0.0, ge=0, description="held-out sampling temperature: 0 = one greedy "
                                    "completion per prompt; above 0, eval_samples completions per prompt and the "
                                    "mean of their scores (pass@1 estimated from k samples, as in DeepSeek-R1)")
    eval_samples: int = Field(1, ge=1, description="completions per held-out prompt when eval_temperature > 0")
    eval_verifier: str = Field("math", description="the held-out verifier, a registered reward; keep it out "
                               "of the training rewards so reward hacking shows as the two diverging")
    eta_sweep: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 1.0], description="WARP: LITI "
                                   "etas at which the final merge is evaluated (the reward/KL front)")
    rewards_max_failed_steps: int = Field(
        3, ge=1, description="reward health: the stage stops with an error when a reward scores no sample of a "
        "step (every call raised or timed out) for this many consecutive steps, or when no sample of a step "
        "got a total (all skipped) for as many; the last step checkpoint stays usable")

    def prompts_per_pass(self, micro_batch: int, rows_per_prompt: int) -> int:
        """Prompts whose completions (rows_per_prompt each) one forward/backward pass of the loss holds."""
        return micro_batch if self.rows_per_pass == 0 else max(1, min(micro_batch, self.rows_per_pass // rows_per_prompt))

    @model_validator(mode="after")
    def _check(self) -> "PolicySection":
        if self.bon_n > self.anchor_samples:
            raise ValueError(f"policy.bon_n={self.bon_n} needs policy.anchor_samples >= {self.bon_n} (the forward "
                             f"term is the best of the first bon_n anchor samples); got {self.anchor_samples}")
        if self.eval_samples > 1 and self.eval_temperature == 0:
            raise ValueError(f"policy.eval_samples={self.eval_samples} needs policy.eval_temperature > 0 (greedy "
                             "completions are all the same); fix: set eval_temperature (e.g. 0.7) or eval_samples=1")
        if "" in self.stop:
            raise ValueError("policy.stop holds an empty string, which every token contains; remove it")
        if self.quantile == "jbond" and self.anchor_samples != 2:
            raise ValueError(f"policy.quantile=jbond is the paper's rule for 2 anchor samples; with "
                             f"anchor_samples={self.anchor_samples} set policy.quantile=log")
        return self
    # WARP (WARP paper)
    warp_runs: int = Field(2, ge=1, description="M independent RL runs merged by SLERP (paper: 2)")
    warp_iterations: int = Field(2, ge=1, description="I iterations; each LITI result is the next init")
    warp_mu: float = Field(0.01, gt=0, le=1, description="WARP anchor EMA rate mu (paper: 0.01)")
    warp_beta: float = Field(0.1, ge=0, description="WARP KL coefficient: reward r - beta (log pi - log anchor)")
    liti_eta: float = Field(0.3, ge=0, le=1, description="LITI: next init = (1-eta) init + eta slerp (paper: 0.3)")


class RewardSpec(Section):
    name: str = Field(description="a registered reward (math, format, code, safety, an installed "
                      "'posttrain.rewards' entry point), 'package.module:attr' or 'path/to/file.py:attr'")
    weight: float = Field(1.0, description="weight in the sum of rewards; 0 = computed and logged only")
    timeout_s: float = Field(10.0, gt=0, description="deadline of one reward call (a batch); past it the "
                             "batch's samples count as timeouts and are handled per on_error")
    on_error: Literal["skip", "zero", "raise"] = Field(
        "skip", description="a sample this reward could not score (it raised, timed out, or gave None): "
        "skip = drop the sample; zero = this reward counts 0 for it; raise = stop the run on an error or timeout")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options for the reward")


class ExportSection(Section):
    dtype: Dtype = Field("bfloat16", description="dtype of the exported safetensors")
    dir: Optional[str] = Field(None, description="output directory; null = <run_dir>/<name>/export")


class TrackingSection(Section):
    wandb: bool = Field(False, description="log to Weights & Biases (metrics.jsonl is always written)")
    project: str = Field("posttrain", description="wandb project")
    entity: Optional[str] = Field(None, description="wandb entity (team or user); null = your default")
    run_name: Optional[str] = Field(None, description="wandb run name; null = the config's name")
    tags: list[str] = Field(default_factory=list, description="wandb tags")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="wandb mode; auto = online when logged in, else offline")
    log_every: int = Field(10, ge=1, description="steps between metric logs")


class CheckpointSection(Section):
    every: int = Field(100, ge=0, description="optimizer steps between step checkpoints (0 = only at the end "
                       "of a stage); SIGTERM also writes one")
    keep: int = Field(2, ge=1, description="step checkpoints kept per stage (the newest)")
    keep_optimizer: bool = Field(
        False, description="keep a finished stage's newest step checkpoints (model + optimizer states) so "
        "that raising its steps and resume=true continues it; false deletes them once the stage (or a WARM "
        "member, a WARP run) has written its result, keeping the final model and its summary")


class Config(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = Field(
        "posttrain", description="run name; outputs go to <run_dir>/<name>/ (default: the recipe's name)")
    run_dir: str = Field("runs", description="parent directory of all runs")
    seed: int = Field(0, description="random seed")
    dry_run: bool = Field(False, description="print the resolved config and the plan (parameters, "
                          "memory per device), then exit without loading weights")
    resume: bool = Field(False, description="continue from the checkpoints in <run_dir>/<name>/")
    stages: list[Stage] = Field(default_factory=list, description="stages to run, in pipeline order: "
                                "distill, warm, policy, qat, export (default none: recipes choose)")
    model: ModelSection = Field(default_factory=ModelSection, description="models")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="sharding")
    data: DataSection = Field(default_factory=DataSection, description="datasets and batch shapes")
    distill: DistillSection = Field(default_factory=DistillSection, description="stage: distillation")
    warm: WarmSection = Field(default_factory=WarmSection, description="stage: WARM reward models")
    policy: PolicySection = Field(default_factory=PolicySection, description="stage: J-BOND / WARP")
    qat: QatSection = Field(default_factory=QatSection, description="stage: quantization-aware training")
    rewards: list[RewardSpec] = Field(default_factory=list, description="weighted rewards of the policy "
                                      "stage: a list of {name, weight, timeout_s, options}")
    export: ExportSection = Field(default_factory=ExportSection, description="stage: HF export")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="step checkpoints "
                                          "of the training stages (resume=true continues from the newest)")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="experiment tracking")

    def missing_data(self) -> list[str]:
        """The data each planned stage needs and the config does not name, one line each with the fix.
        Checked when the config is read, so no stage finds it after the ones before it have trained."""
        needs = [("distill", "train", "a .jsonl/.json/.parquet path, a bundled dataset name or a hub dataset",
                  "data.train=arithmetic"),
                 ("qat", "train", "text the float model's targets are computed on", "data.train=arithmetic"),
                 ("warm", "preferences", "pairs: prompt/chosen/rejected, or chosen/rejected message lists",
                  "data.preferences=arithmetic_pairs"),
                 ("policy", "prompts", "rows with a prompt and the columns its rewards read", "data.prompts=arithmetic")]
        return [f"stage '{stage}' needs data.{key} ({what}); fix: e.g. {fix}, or drop '{stage}' from stages"
                for stage, key, what, fix in needs if stage in self.stages and getattr(self.data, key) is None]

    def unresolved(self) -> list[str]:
        """What the config names and nothing answers to, one line each with the fix: dataset names and
        files, model sources, reward names and their options. Checked when the config is read, before any
        weights load (train.py stops; a dry run lists them and exits 2); nothing is loaded or built."""
        problems = []
        for key in ("train", "eval", "prompts", "preferences", "eval_preferences", "eval_safety"):
            name = getattr(self.data, key)
            if name is not None and (problem := _data_problem(str(name))):
                problems.append(f"data.{key}: {problem}")
        for role in ("student", "teacher"):
            spec = getattr(self.model, role)
            if spec is not None and spec.source is not None and (problem := _source_problem(spec.source)):
                problems.append(f"model.{role}.source: {problem}")
        if self.model.tokenizer is not None and (problem := _source_problem(self.model.tokenizer)):
            problems.append(f"model.tokenizer: {problem}")
        if "policy" in self.stages:
            specs = [(f"rewards.{i} ({r.name})", r.name, r.options) for i, r in enumerate(self.rewards)]
            specs.append(("policy.eval_verifier", self.policy.eval_verifier, {}))
            for where, name, options in specs:
                if name == "reward_model" and "path" not in options:
                    if "warm" not in self.stages and not (self.out_dir / "warm" / "reward_model").exists():
                        problems.append(f"{where}: reward_model has no options.path and no warm stage produces one; "
                                        "fix: run the warm stage first (stages=[...,warm,policy]) or give "
                                        "options: {path: DIR}")
                    continue
                if problem := _reward_problem(name, options):
                    problems.append(f"{where}: {problem}")
        return problems

    @model_validator(mode="after")
    def _check(self) -> "Config":
        order = [s for s in STAGE_ORDER if s in self.stages]
        if self.stages != order:
            raise ValueError(f"stages must be unique and in pipeline order {list(STAGE_ORDER)}, got "
                             f"{self.stages}; fix: stages=[{','.join(order)}]")
        if "distill" in self.stages and self.model.teacher is None:
            raise ValueError("stage 'distill' needs a teacher; fix: set model.teacher.source or "
                             "model.teacher.preset, or drop 'distill' from stages")
        if "qat" in self.stages and self.qat.teacher == "model.teacher" and self.model.teacher is None:
            raise ValueError("qat.teacher=model.teacher needs a teacher; fix: set model.teacher.source, or "
                             "qat.teacher=self (the student's own float weights)")
        if "policy" in self.stages:
            if not self.rewards:
                raise ValueError("stage 'policy' needs at least one reward; fix: rewards=[{name: math}]")
            if self.policy.max_new_tokens >= self.data.max_seq_len:
                raise ValueError(f"policy.max_new_tokens ({self.policy.max_new_tokens}) must be below "
                                 f"data.max_seq_len ({self.data.max_seq_len}), which bounds prompt + reply")
        names = [r.name for r in self.rewards]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"rewards lists {dupes} more than once; merge them into one entry")
        return self

    @property
    def out_dir(self) -> Path:
        """Where this run writes: <run_dir>/<name>/ (each stage below it)."""
        return Path(self.run_dir) / self.name


__all__ = ["Config", "ModelSpec", "RewardSpec", "RECIPES_DIR", "STAGE_ORDER"]
