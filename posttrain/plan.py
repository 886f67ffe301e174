"""The dry-run plan: architectures, parameter counts and memory per device, without loading weights.

Architectures come from the preset (with `arch` changes) or, for a source without a preset, from
`read_config(source)`, which reads only metadata. Parameter counts come from a meta-device build.

Memory per device, in bytes, for P parameters and W = distributed.world_size devices. A tensor
kind is divided by W once the ZeRO stage shards it, and is whole below that stage:

    trained model, mixed precision (dtype bfloat16, GPU):   weights 2P (stage 3), grads 2P
        (stage >= 2), Adam states 12P = fp32 master + m + v (stage >= 1)
    trained model, float32 (CPU):                            weights 4P, grads 4P, Adam 8P
    offload_optimizer:                                       Adam states live in host memory (0 here)
    frozen model (teacher, reward model) and eval-only model (WARP's evaluation copy, WARM's average):
        P x bytes(its dtype), sharded under stage 3; WARM's shared init: P x bytes, whole
    WARM's merge, after its members: the eval-only model and M members' shards, 4P each
    not counted (a note on GPU recipes): each rank loads a model whole before the engine shards it,
        and WARM's shared init and WARP's base wait in host memory while the sharded engines train
    QAT: the distill rows with the float teacher (the student's own frozen copy by default) and, in
        the train step, the fake-quantized linear weights (P_linear x bytes, whole on every rank: the
        forward keeps them for its backward; / L with activation checkpointing) plus float32
        temporaries of quantizing the largest matrix
    EMA anchor (J-BOND, WARP) / running average (WARM):     4P, float32 because a 0.02 EMA step
        rounds away in bf16; sharded under stage 3 like the model it follows
    vision activations (multimodal models): images x (patches x L_v x (8 E + 2 I_v) + S x C) x bytes, one image
        per row (per prompt in the policy stage; x 5 with Pan & Scan), L_v = 1 while the tower is frozen
    activations of one micro-batch (not sharded): rows x T x L x a x bytes(dtype), with T / N tokens
        under sequence parallelism of degree N (each rank holds its shard of the sequence), where
        a = 8 C + 4 I + 3 H D + 3 K D values per token per layer (block inputs, norms, q/k/v,
        attention output, the gated MLP's three I-wide tensors), or with activation
        checkpointing a = C per layer plus one full layer
    logits: the losses are chunked, so one chunk of min(loss_chunk_tokens, rows x T) tokens x V
        x 4 bytes x 2 (float32 logits and their log-softmax, which becomes the gradient in place)
        -- never rows x T x V
    head gradient: with a trained (tied) embedding, the fused head holds its float32 V x C gradient
        from forward to backward; when a step has several passes (the policy's loss passes) it sits
        beside the gradients of the passes before, until autograd adds it to them
    distill's live teacher targets, a phase of their own before the student's forward: one chunk x V
        x 4 bytes x 3 (logits, log-probs, Gumbel keys; x 2 for topk targets, which draw no keys)
    rollouts: KV cache rows x 2 K D bytes x (G T + S min(window, T)) for G global and S sliding
        layers, plus under stage 3 the sampling model gathered whole (P x bytes), once per phase;
        on a CPU, the sampler's oneDNN-packed copy of a float32 model's weights (4P) while it samples

    peak = persistent (trained + frozen + anchor) + max(train step, rollout phase, merge, targets)

Rows per step: distill micro_batch; warm 2 x micro_batch (chosen, rejected); J-BOND
micro_batch x (samples_per_prompt + 1) trained (the policy samples and the best anchor sample, as
policy.bond_step does) and micro_batch x max(samples_per_prompt, anchor_samples) rolled out; WARP
micro_batch x samples_per_prompt. The policy's loss runs in passes of policy.rows_per_pass rows
(whole prompts' groups), so its train step holds one pass's rows. A rough guide: allocator fragmentation, DeepSpeed buckets and
CUDA context (1-3 GB) are not counted. Measured on CPU (the 270M distilled at T = 8,192, ZeRO 0,
checkpointing, steady state): 6.29 GiB peak RSS against 6.12 planned (README, "Long context").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch

from .config import Config, ModelSpec
from .embedded import EMBEDDED_NAME
from .errors import UserError
from .model import pruned_config, PRESETS, GemmaConfig, param_counts
from .sampler import kv_cache_bytes
from .vision import param_count

GiB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2}
LOGIT_COPIES = 2  # a loss chunk's float32 logits and their log-softmax, turned into the gradient in place
# The teacher-targets chunk: logits and log-probs, plus the Gumbel keys when targets are sampled
TARGET_COPIES = {"sampled": 3, "on_policy": 3, "topk": 2}
RM_REWARDS = {"reward_model", "warm"}  # reward names that load the learned (WARM) reward model
GPU_MEMORY = 80 * GiB  # H100 80GB, the card the GPU recipes are planned for


@dataclass
class ModelPlan:
    role: str  # student, teacher, reward_model
    arch: GemmaConfig
    origin: str  # where the architecture comes from, for the table
    counts: dict[str, int]  # param_counts: total, embedding, non_embedding
    dtype: str


@dataclass
class StageMemory:
    trains: str  # which model the stage trains
    rows: dict[str, int] = field(default_factory=dict)  # bytes per device, persistent
    train: dict[str, int] = field(default_factory=dict)  # transient, during a train step
    rollout: dict[str, int] = field(default_factory=dict)  # transient, during sampling
    merge: dict[str, int] = field(default_factory=dict)  # transient, while WARM averages its members
    targets: dict[str, int] = field(default_factory=dict)  # transient, the live teacher's targets (distill)

    @property
    def peak(self) -> int:
        return sum(self.rows.values()) + max(sum(self.train.values()), sum(self.rollout.values()),
                                             sum(self.merge.values()), sum(self.targets.values()), 0)


@dataclass
class Plan:
    cfg: Config
    models: dict[str, ModelPlan]
    stages: dict[str, StageMemory]
    notes: list[str]

    @property
    def peak_bytes(self) -> int:
        """Largest estimated memory per device over the planned stages."""
        return max((s.peak for s in self.stages.values()), default=0)

    def format(self) -> str:
        return format_plan(self)


# ----------------------------------------------------------------------------- architectures

@functools.lru_cache(maxsize=None)
def _counts(arch: GemmaConfig) -> dict[str, int]:
    return param_counts(arch)


def _read_config(source: str) -> GemmaConfig:
    if source == EMBEDDED_NAME:
        # The embedded model is the 270M; reading it would assemble the file on first use.
        return PRESETS["270m"]
    from .checkpoint import read_config  # imported here: plans of preset-only recipes never need it
    return read_config(source)


def check_arch(role: str, spec: ModelSpec, found: GemmaConfig) -> None:
    """Raise UserError when a source's architecture differs from the preset the recipe names."""
    expected = spec.preset_config()
    if expected is None or found == expected:
        return
    diffs = [f"{f.name} {getattr(found, f.name)} vs {getattr(expected, f.name)}"
             for f in fields(GemmaConfig) if getattr(found, f.name) != getattr(expected, f.name)]
    shown = "; ".join(d for d in diffs if not d.startswith("layer_types")) or "layer_types"
    raise UserError(f"model.{role}.source '{spec.source}' is not the '{spec.preset}' architecture "
                    f"(source vs preset: {shown}); fix: correct model.{role}.preset, or set it to null "
                    "to take the architecture from the source")


def resolve_arch(role: str, spec: ModelSpec) -> tuple[GemmaConfig, str]:
    """(architecture, where it came from) of a model spec, reading metadata only."""
    if spec.source is None:
        arch = spec.preset_config()
        return arch, f"preset {spec.preset}{' + arch' if spec.arch else ''}, random init"
    found = _read_config(spec.source)
    check_arch(role, spec, found)
    return found, spec.source


def kept_layers(role: str, spec: ModelSpec, arch: GemmaConfig) -> GemmaConfig:
    """The architecture after `model.<role>.layers` (unchanged without it); a bad list is a UserError."""
    if not spec.layers:
        return arch
    try:
        return pruned_config(arch, spec.layers)
    except ValueError as e:
        raise UserError(f"model.{role}.layers: {e}") from None


def with_vision(role: str, spec: ModelSpec, arch: GemmaConfig) -> GemmaConfig:
    """The architecture after `model.<role>.vision` (a new tower on a text-only model)."""
    if spec.vision is None:
        return arch
    if arch.vision is not None:
        raise UserError(f"model.{role}.vision: the model already has a vision tower; fix: drop model.{role}.vision")
    from .vision import VisionConfig

    return arch.with_(vision=VisionConfig(**spec.vision))


def _model_plan(role: str, spec: ModelSpec) -> ModelPlan:
    arch, origin = resolve_arch(role, spec)
    if spec.layers:
        arch, origin = kept_layers(role, spec, arch), origin + f", layers {spec.layers}"
    if spec.vision is not None:
        arch, origin = with_vision(role, spec, arch), origin + ", new vision tower"
    return ModelPlan(role, arch, origin, _counts(arch), spec.dtype)


# ----------------------------------------------------------------------------- memory

def _shard(cfg: Config, from_stage: int) -> int:
    return cfg.distributed.world_size if cfg.distributed.zero_stage >= from_stage else 1


def _trainable(cfg: Config, m: ModelPlan) -> int:
    """Parameters that get gradients and Adam states: all but what engine.freeze leaves as loaded."""
    frozen = m.counts["embedding"] if cfg.model.freeze_embeddings else 0
    if m.arch.vision is not None:
        projector = param_count(m.arch.vision, m.arch.hidden_size)
        frozen += 0 if cfg.model.train_vision_tower else projector["tower"]
        frozen += 0 if cfg.model.train_projector else projector["projector"]
    return m.counts["total"] - frozen


def _trained(cfg: Config, m: ModelPlan) -> dict[str, int]:
    P, trainable = m.counts["total"], _trainable(cfg, m)
    w, g, o = (2, 2, 12) if m.dtype == "bfloat16" else (4, 4, 8)
    opt = 0 if cfg.distributed.offload_optimizer else o * trainable // _shard(cfg, 1)
    return {"trained weights": w * P // _shard(cfg, 3), "gradients": g * trainable // _shard(cfg, 2),
            "Adam states": opt}


def _frozen(cfg: Config, m: ModelPlan, label: str, dtype: str | None = None) -> dict[str, int]:
    return {label: BYTES[dtype or m.dtype] * m.counts["total"] // _shard(cfg, 3)}


def activation_bytes(a: GemmaConfig, tokens: int, bytes_per_value: int, checkpointing: bool) -> int:
    """Activations the backward keeps for `tokens` tokens (the formula in the module docstring)."""
    layer = 8 * a.hidden_size + 4 * a.intermediate_size + 3 * (a.num_heads + a.num_kv_heads) * a.head_dim
    per_token = a.num_layers * a.hidden_size + layer if checkpointing else a.num_layers * layer
    return tokens * per_token * bytes_per_value


def local_tokens(cfg: Config) -> int:
    """Tokens of one sequence on one rank: max_seq_len, split over the sequence-parallel ranks."""
    return -(-cfg.data.max_seq_len // cfg.distributed.sequence_parallel)


def _train_step(cfg: Config, m: ModelPlan, rows: int, images: int | None = None) -> dict[str, int]:
    a, T, b = m.arch, local_tokens(cfg), BYTES[m.dtype]
    chunk = min(cfg.data.loss_chunk_tokens, rows * T)
    out = {"activations": activation_bytes(a, rows * T, b, cfg.distributed.activation_checkpointing),
           "logits chunk": chunk * a.vocab_size * 4 * LOGIT_COPIES}
    if a.vision is not None:
        out["vision activations"] = _vision_activations(cfg, m, rows if images is None else images)
    return out


def _vision_activations(cfg: Config, m: ModelPlan, images: int) -> int:
    """The tower's activations for `images` images (one per row, or per prompt in the policy stage; Pan & Scan
    adds up to pan_and_scan_max_num_crops more): every layer's when the tower trains, else one layer's at
    a time (a frozen tower runs without a graph), plus the projected soft tokens."""
    v, b = m.arch.vision, BYTES[m.dtype]
    if cfg.data.pan_and_scan:
        images *= 1 + 4  # transformers' default pan_and_scan_max_num_crops
    patches = (v.image_size // v.patch_size) ** 2
    layers = v.num_layers if cfg.model.train_vision_tower else 1
    return images * (patches * layers * (8 * v.hidden_size + 2 * v.intermediate_size)
                     + v.mm_tokens_per_image * m.arch.hidden_size) * b


def _rollout(cfg: Config, m: ModelPlan, rows: int) -> dict[str, int]:
    a, T, b = m.arch, cfg.data.max_seq_len, BYTES[m.dtype]
    out = {"KV cache": kv_cache_bytes(a, T, rows, b)}
    if cfg.distributed.zero_stage == 3:
        out["gathered weights"] = b * m.counts["total"]
    if m.dtype == "float32" and not torch.cuda.is_available():  # sampler.PackedWeights (bf16 packs only on some CPUs)
        out["packed weights (CPU)"] = 4 * m.counts["total"]
    return out


def _distill(cfg: Config, student: ModelPlan, teacher: ModelPlan, section=None) -> StageMemory:
    d = section or cfg.distill
    mem = StageMemory("student", _trained(cfg, student))
    if not d.cache_targets:
        mem.rows |= _frozen(cfg, teacher, "teacher (frozen)")
        chunk = min(cfg.data.loss_chunk_tokens, cfg.data.micro_batch_size * local_tokens(cfg))
        mem.targets = {"logits chunk": chunk * teacher.arch.vocab_size * 4 * TARGET_COPIES[d.method]}
    mem.train = _train_step(cfg, student, cfg.data.micro_batch_size)
    if d.method == "on_policy":
        mem.rollout = _rollout(cfg, student, cfg.data.micro_batch_size)
    return mem


def _qat(cfg: Config, student: ModelPlan, teacher: ModelPlan | None) -> StageMemory:
    """The distill loop's memory with the float teacher (the student's own copy by default) and the
    fake-quantized weights: the forward keeps each quantized matrix for its backward (whole on every
    rank, even under ZeRO-3; one block's with activation checkpointing), plus the float32 temporaries
    of quantizing the largest one."""
    q, a, b = cfg.qat, student.arch, BYTES[student.dtype]
    mem = _distill(cfg, student, student if q.teacher == "self" else teacher, q)
    mem.trains = f"student ({q.format} fake-quantized)"
    layers = student.counts["non_embedding"]
    if cfg.distributed.activation_checkpointing:  # a checkpointed block quantizes again in its backward
        layers //= a.num_layers
    embedding = student.counts["embedding"] if q.quantize_embedding else 0
    largest = max(a.intermediate_size * a.hidden_size, a.num_heads * a.head_dim * a.hidden_size, embedding)
    mem.train |= {"fake-quant weights": b * (layers + embedding), "quantize temporaries": 4 * 4 * largest}
    return mem


def _warm(cfg: Config, rm: ModelPlan) -> StageMemory:
    mem = StageMemory("reward model", _trained(cfg, rm))
    mem.train = _train_step(cfg, rm, 2 * cfg.data.micro_batch_size)
    # after the members: the eval-only model holding their average, and every member's shards (fp32)
    mem.merge = _frozen(cfg, rm, "eval-only model") | {
        "member shards (fp32)": cfg.warm.members * 4 * rm.counts["total"] // _shard(cfg, 3)}
    return mem


def _policy(cfg: Config, policy: ModelPlan, rm: ModelPlan | None) -> StageMemory:
    mb, p = cfg.data.micro_batch_size, cfg.policy
    mem = StageMemory("policy", _trained(cfg, policy) | _frozen(cfg, policy, "average / anchor (fp32)", "float32"))
    if rm is not None:
        mem.rows |= _frozen(cfg, rm, "reward model (frozen)")
    if "warp" in p.algorithm:  # evaluates the merges and the eta sweep beside each run's engine
        mem.rows |= _frozen(cfg, policy, "eval-only model")
    # (trained rows, rolled-out rows); bond_then_warp runs both phases, so its peak is the larger.
    phases = [(mb * (p.samples_per_prompt + 1), mb * max(p.samples_per_prompt, p.anchor_samples))] \
        if "bond" in p.algorithm else []
    phases += [(mb * p.samples_per_prompt,) * 2] if "warp" in p.algorithm else []
    # the loss runs in passes of policy.rows_per_pass rows (whole prompts' groups): one pass's activations
    raw, phases = phases, [(p.prompts_per_pass(mb, t // mb) * (t // mb), r) for t, r in phases]
    train_rows, rollout_rows = max(r[0] for r in phases), max(r[1] for r in phases)
    mem.train = _train_step(cfg, policy, train_rows, images=mb)  # a prompt's images are encoded once
    if train_rows < max(r[0] for r in raw) and not cfg.model.freeze_embeddings:  # several passes
        mem.train["head gradient (fp32)"] = 4 * policy.counts["embedding"]  # whole, as autograd makes it
    mem.rollout = _rollout(cfg, policy, rollout_rows)
    return mem


def plan(cfg: Config) -> Plan:
    """Architectures, parameter counts and memory per device of every planned stage; no weights read."""
    notes = [f"not runnable as it is: {line}" for line in cfg.missing_data()]
    models = {"student": _model_plan("student", cfg.model.student)}
    if cfg.model.teacher is not None:
        models["teacher"] = _model_plan("teacher", cfg.model.teacher)
    student = models["student"]
    needs_rm = "warm" in cfg.stages or ("policy" in cfg.stages and (
        cfg.policy.tie_break == "reward_model" or any(r.name in RM_REWARDS for r in cfg.rewards)))
    rm = None
    if needs_rm:
        # WARM reward models share the student's backbone (they start from its SFT weights) plus a
        # scalar head: C weights and a bias.
        C = student.arch.hidden_size
        counts = {k: v + (C + 1 if k != "embedding" else 0) for k, v in student.counts.items()}
        rm = models["reward_model"] = ModelPlan("reward_model", student.arch, "student backbone + scalar head",
                                                counts, student.dtype)

    stages = {}
    if "distill" in cfg.stages:
        stages["distill"] = _distill(cfg, student, models["teacher"])
    if "warm" in cfg.stages:
        stages["warm"] = _warm(cfg, rm)
    if "policy" in cfg.stages:
        stages["policy"] = _policy(cfg, student, rm)
    if "qat" in cfg.stages:
        stages["qat"] = _qat(cfg, student, models.get("teacher"))

    for role, m in models.items():
        if role != "reward_model" and getattr(cfg.model, role).source is None:
            notes.append(f"{role} has no source: random init of the architecture (fine for plans and "
                         f"smoke tests); fix for real runs: model.{role}.source=/path/to/weights")
    teacher = models.get("teacher")
    if teacher is not None and teacher.arch.vocab_size != student.arch.vocab_size:
        V = min(teacher.arch.vocab_size, student.arch.vocab_size)
        notes.append(f"teacher vocab {teacher.arch.vocab_size} vs student {student.arch.vocab_size}: "
                     f"distillation uses the first {V} ids (the extra rows are the image token and padding)")
    if cfg.distill.cache_targets and "distill" in stages:
        notes.append("distill.cache_targets: the teacher runs in its own pass before the student trains "
                     "(its memory is not in the distill column)")
    if on_gpu := student.dtype == "bfloat16":
        whole = max(m.counts["total"] * BYTES[m.dtype] for m in models.values())
        notes.append(f"whole models: each rank loads a model whole onto its device before the engine shards it "
                     f"(up to {_gib(whole)} GiB for a moment), and WARM's shared init and WARP's base wait in host "
                     f"memory while the sharded engines train ({_gib(whole)} GiB of host memory per rank)")
    if cfg.data.max_seq_len > 32_768:
        T = cfg.data.max_seq_len
        notes.append(f"long context: one {T:,}-token sequence's bf16 KV cache is {_gib(kv_cache_bytes(student.arch, T))} "
                     f"GiB with the 5:1 local/global layers ({_gib(kv_cache_bytes(student.arch, T, ring=False))} GiB "
                     "if every layer were global); `python -m posttrain.plan_long` tabulates sizes and "
                     "sequence-parallel degrees")
    if cfg.distributed.offload_optimizer:
        notes.append("offload_optimizer: Adam states need host memory: "
                     f"{_gib(12 * student.counts['total'] // cfg.distributed.world_size)} GiB per device")
    peak = max((s.peak for s in stages.values()), default=0)
    if on_gpu and peak > GPU_MEMORY:
        notes.append(f"estimated peak {_gib(peak)} GiB exceeds an 80 GB GPU; fix: raise distributed.zero_stage "
                     "or world_size, enable activation_checkpointing or offload_optimizer, or lower "
                     "micro_batch_size / max_seq_len")
    return Plan(cfg, models, stages, notes)


# ----------------------------------------------------------------------------- printing

def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(p: Plan) -> str:
    cfg, d = p.cfg, p.cfg.distributed
    lines = [f"plan for '{cfg.name}': stages {', '.join(cfg.stages) or '(none)'}"]
    T, mb = cfg.data.max_seq_len, cfg.data.micro_batch_size
    replicas = d.world_size // d.sequence_parallel  # data-parallel replicas: a sequence spans sequence_parallel ranks
    per_step = mb * cfg.data.grad_accum * replicas
    lines.append(f"  {d.world_size} device(s) on {d.nodes} node(s), ZeRO stage {d.zero_stage}"
                 f"{', optimizer offload' if d.offload_optimizer else ''}"
                 f"{', activation checkpointing' if d.activation_checkpointing else ''}"
                 f"{f', sequence parallel {d.sequence_parallel}' if d.sequence_parallel > 1 else ''}; "
                 f"batch {mb} x {T} tokens x grad_accum {cfg.data.grad_accum} x {replicas} replica(s) = "
                 f"{per_step} sequences ({per_step * T:,} tokens) per step")
    lines += ["", "models"]
    header = (f"  {'role':<13}{'params':>10}{'non-emb':>10}{'vision':>9}{'vocab':>8}{'layers':>7}{'hidden':>7}  "
              f"{'dtype':<9} source")
    lines.append(header)
    for m in p.models.values():
        vision = _params(m.counts["vision"]) if m.counts.get("vision") else "-"
        lines.append(f"  {m.role:<13}{_params(m.counts['total']):>10}{_params(m.counts['non_embedding']):>10}"
                     f"{vision:>9}{m.arch.vocab_size:>8}{m.arch.num_layers:>7}{m.arch.hidden_size:>7}  "
                     f"{m.dtype:<9} {m.origin}")
    if p.stages:
        names = list(p.stages)
        labels = list(dict.fromkeys(k for s in p.stages.values() for k in s.rows))
        lines += ["", "memory per device, GiB (estimate; formula in posttrain/plan.py)"]
        lines.append(f"  {'stage':<28}" + "".join(f"{n:>14}" for n in names))
        lines.append(f"  {'trains':<28}" + "".join(f"{p.stages[n].trains:>14}" for n in names))

        def row(title: str, label: str, part: str) -> str:
            cells = [getattr(p.stages[n], part).get(label) for n in names]
            return f"  {title + label:<28}" + "".join(f"{_gib(c) if c is not None else '-':>14}" for c in cells)

        lines += [row("", label, "rows") for label in labels]
        for part, title in (("targets", "targets: "), ("train", "train: "), ("rollout", "rollout: "),
                            ("merge", "merge: ")):
            part_labels = list(dict.fromkeys(k for s in p.stages.values() for k in getattr(s, part)))
            lines += [row(title, label, part) for label in part_labels]
        lines.append(f"  {'peak':<28}" + "".join(f"{_gib(p.stages[n].peak):>14}" for n in names))
    if p.notes:
        lines += ["", "notes"] + [f"  - {n}" for n in p.notes]
    return "\n".join(lines)


__all__ = ["Plan", "ModelPlan", "StageMemory", "plan", "format_plan", "resolve_arch", "check_arch", "with_vision"]
