"""The run configuration: a typed schema, recipe files and `key=value` overrides.

    cfg = load_config(["recipe=it_4b", "distill.lr=1e-5", "model.student.source=/ckpt/gemma-3-4b-pt"])

A recipe is `recipes/NAME.yaml` (or a path to any .yaml file). It may start with `base: OTHER`
to inherit another recipe: mappings merge key by key, anything else (lists included) is
replaced. Overrides are dotted keys; values are YAML (`tracking.tags=[a,b]`,
`model.teacher=null`, `rewards.0.weight=0.5`) and replace the value at that key.

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
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .embedded import EMBEDDED_NAME
from .errors import UserError
from .model import PRESETS, GemmaConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
STAGE_ORDER = ("distill", "warm", "policy", "export")

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

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.source is None and self.preset is None:
            raise ValueError("set source (HF directory, .gguf file or 'gemma3-270m') or preset "
                             f"({', '.join(PRESETS)}), or both")
        if self.arch and self.preset is None:
            raise ValueError("arch changes a preset's architecture and needs preset set; with only a "
                             "source the architecture comes from the checkpoint")
        fields = {f.name: f for f in dataclasses.fields(GemmaConfig) if f.name != "layer_types"}
        for key, value in self.arch.items():
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(fields)}"
                raise ValueError(f"arch has unknown field '{key}'{hint}")
            wants_int = fields[key].type in (int, "int")
            ok = isinstance(value, int) if wants_int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                raise ValueError(f"arch.{key} must be {'an integer' if wants_int else 'a number'}, got {value!r}")
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


class DistributedSection(Section):
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 replicates everything, 1 "
                            "shards optimizer states, 2 also gradients, 3 also weights")
    world_size: int = Field(default_factory=_default_world_size, ge=1, description="devices to plan for "
                            "(memory estimate of the dry run); default: $WORLD_SIZE, else 1. The real "
                            "run uses the process group torchrun gives it")
    nodes: int = Field(1, ge=1, description="machines in the planned job (world_size / nodes devices each)")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: keep optimizer states (and the "
                                    "update) in CPU memory; needs zero_stage >= 1")
    activation_checkpointing: bool = Field(False, description="recompute each block in the backward pass: "
                                           "activation memory of one layer instead of all, ~30% more compute")
    ds_config: dict[str, Any] = Field(default_factory=dict, description="extra DeepSpeed config, merged over "
                                      "the generated one (e.g. {gradient_clipping: 1.0})")

    @model_validator(mode="after")
    def _check(self) -> "DistributedSection":
        if self.world_size % self.nodes:
            raise ValueError(f"distributed.world_size ({self.world_size}) must be divisible by "
                             f"distributed.nodes ({self.nodes})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
        return self


class DataSection(Section):
    train: Optional[str] = Field(None, description="distillation data (prompts or chats): a .jsonl/.json/"
                                 ".parquet path, a bundled dataset name, or a hub dataset name")
    eval: Optional[str] = Field(None, description="held-out data for evaluation, same forms as `train`")
    preferences: Optional[str] = Field(None, description="WARM preference pairs (prompt, chosen, rejected)")
    prompts: Optional[str] = Field(None, description="policy-stage prompts with the columns their rewards need")
    eval_prompts: list[str] = Field(default_factory=list, description="a few prompts whose greedy "
                                    "continuations are printed as a smoke evaluation")
    max_seq_len: int = Field(1024, ge=8, description="tokens per training sequence (prompt + reply)")
    micro_batch_size: int = Field(1, ge=1, description="sequences (prompts in the policy stage) per device per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    loss_chunk_tokens: int = Field(1024, ge=1, description="tokens per chunk of the vocabulary-sized "
                                   "losses; B x T x V logits are never materialised")


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
    steps: int = Field(1000, ge=0, description="optimizer steps")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps, then cosine decay")
    temperature: float = Field(1.0, gt=0, description="teacher sampling temperature for the targets")
    cache_targets: bool = Field(False, description="precompute teacher targets to disk (ids int32 + probs "
                                "fp16) and stream them, so teacher and student never share memory")


class WarmSection(Section):
    members: int = Field(6, ge=1, description="M reward models, averaged uniformly (paper: 6)")
    lrs: list[float] = Field(default_factory=lambda: [1e-5, 4e-5, 1e-4], min_length=1,
                             description="learning rates the members are spread over (paper: {1e-5, 4e-5, 1e-4})")
    dropouts: list[float] = Field(default_factory=lambda: [0.05, 0.1], min_length=1,
                                  description="dropout rates the members are spread over (paper: {0.05, 0.1})")
    probe_steps: int = Field(100, ge=0, description="linear-probing steps of the shared scalar head, "
                             "backbone frozen, before the members fork")
    steps: int = Field(1000, ge=0, description="fine-tuning steps per member")
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin: loss = -log sigmoid(r_chosen - "
                          "r_rejected - margin)")
    ensemble_baseline: bool = Field(False, description="also evaluate prediction ensembling (ENS), the "
                                    "paper's baseline")

    @model_validator(mode="after")
    def _check(self) -> "WarmSection":
        if bad := [d for d in self.dropouts if not 0 <= d < 1]:
            raise ValueError(f"warm.dropouts must lie in [0, 1), got {bad}")
        if bad := [lr for lr in self.lrs if lr <= 0]:
            raise ValueError(f"warm.lrs must be positive, got {bad}")
        return self


class PolicySection(Section):
    algorithm: Literal["bond", "warp", "bond_then_warp"] = Field(
        "bond", description="bond: J-BOND; warp: WARP; bond_then_warp: J-BOND, then WARP from its result")
    steps: int = Field(1000, ge=0, description="optimizer steps of J-BOND, and of each WARP run per iteration")
    lr: float = Field(1e-6, gt=0, description="learning rate (AdamW)")
    max_new_tokens: int = Field(256, ge=1, description="rollout length cap")
    temperature: float = Field(1.0, ge=0, description="rollout sampling temperature (0 = greedy)")
    samples_per_prompt: int = Field(2, ge=2, description="WARP: completions per prompt (leave-one-out baseline)")
    tie_break: Literal["half", "reward_model"] = Field(
        "half", description="J-BOND ties between rewards (0/1 verifiers): count as half a win, or break "
        "with the learned reward model's score")
    # J-BOND (BOND paper, section 5)
    beta: float = Field(0.5, ge=0, le=1, description="J-BOND mix: (1-beta) forward KL + beta backward KL")
    gamma: float = Field(0.0, ge=0, description="J-BOND weight of the extra KL(policy || anchor) term")
    eta: float = Field(0.02, gt=0, le=1, description="J-BOND anchor EMA: anchor <- (1-eta) anchor + eta policy")
    anchor_samples: int = Field(2, ge=2, description="J-BOND anchor samples per prompt (paper: 2)")
    # WARP (WARP paper)
    warp_runs: int = Field(2, ge=1, description="M independent RL runs merged by SLERP (paper: 2)")
    warp_iterations: int = Field(2, ge=1, description="I iterations; each LITI result is the next init")
    warp_mu: float = Field(0.01, gt=0, le=1, description="WARP anchor EMA rate mu (paper: 0.01)")
    warp_beta: float = Field(0.1, ge=0, description="WARP KL coefficient: reward r - beta (log pi - log anchor)")
    liti_eta: float = Field(0.3, ge=0, le=1, description="LITI: next init = (1-eta) init + eta slerp (paper: 0.3)")


class RewardSpec(Section):
    name: str = Field(description="a built-in reward (rewards registry), 'module:attr' or 'file.py:attr'")
    weight: float = Field(1.0, description="weight in the sum of rewards")
    timeout_s: float = Field(10.0, gt=0, description="deadline per batch; a timeout fails the sample closed")
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


class Config(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = Field(
        "posttrain", description="run name; outputs go to <run_dir>/<name>/ (default: the recipe's name)")
    run_dir: str = Field("runs", description="parent directory of all runs")
    seed: int = Field(0, description="random seed")
    dry_run: bool = Field(False, description="print the resolved config and the plan (parameters, "
                          "memory per device), then exit without loading weights")
    resume: bool = Field(False, description="continue from the checkpoints in <run_dir>/<name>/")
    stages: list[Stage] = Field(default_factory=list, description="stages to run, in pipeline order: "
                                "distill, warm, policy, export (default none: recipes choose)")
    model: ModelSection = Field(default_factory=ModelSection, description="models")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="sharding")
    data: DataSection = Field(default_factory=DataSection, description="datasets and batch shapes")
    distill: DistillSection = Field(default_factory=DistillSection, description="stage: distillation")
    warm: WarmSection = Field(default_factory=WarmSection, description="stage: WARM reward models")
    policy: PolicySection = Field(default_factory=PolicySection, description="stage: J-BOND / WARP")
    rewards: list[RewardSpec] = Field(default_factory=list, description="weighted rewards of the policy "
                                      "stage: a list of {name, weight, timeout_s, options}")
    export: ExportSection = Field(default_factory=ExportSection, description="stage: HF export")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="experiment tracking")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        order = [s for s in STAGE_ORDER if s in self.stages]
        if self.stages != order:
            raise ValueError(f"stages must be unique and in pipeline order {list(STAGE_ORDER)}, got "
                             f"{self.stages}; fix: stages=[{','.join(order)}]")
        if "distill" in self.stages and self.model.teacher is None:
            raise ValueError("stage 'distill' needs a teacher; fix: set model.teacher.source or "
                             "model.teacher.preset, or drop 'distill' from stages")
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


# ----------------------------------------------------------------------------- schema walking

def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] and Annotated[...] down to the type that holds the value."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included ('distill', 'distill.lr', ...)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        inner = _unwrap(field.annotation)
        if _is_model(inner):
            keys += all_keys(inner, key + ".")
        elif name == "arch":
            keys += [f"{key}.{f.name}" for f in dataclasses.fields(GemmaConfig) if f.name != "layer_types"]
    return keys


def _suggest(key: str) -> str:
    """'; did you mean ...?' for an unknown dotted key: a sibling when the parent is known, else any key."""
    parts = key.split(".")
    close = []
    if len(parts) > 1:
        try:
            parent = _unwrap(_leaf_type(parts[:-1]))
        except UserError:
            parent = None
        if _is_model(parent):
            close = [".".join(parts[:-1] + [m]) for m in difflib.get_close_matches(parts[-1], parent.model_fields, n=1)]
    close = close or difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; see `python train.py --help` for all keys"


def _leaf_type(parts: list[str]) -> Any:
    """The annotation at a dotted key; raises UserError for keys the schema does not have.

    Dict-valued fields (arch, options, ds_config) accept any sub-key here; their own
    validators check them. List fields take an integer index: rewards.0.weight.
    """
    annotation: Any = Config
    for i, part in enumerate(parts):
        inner = _unwrap(annotation)
        origin = typing.get_origin(inner)
        if _is_model(inner):
            if part not in inner.model_fields:
                key = ".".join(parts)
                raise UserError(f"unknown key '{key}'{_suggest(key)}")
            annotation = inner.model_fields[part].annotation
        elif origin is dict:
            return Any
        elif origin is list:
            if not part.isdigit():
                raise UserError(f"'{'.'.join(parts[:i])}' is a list; index it with a number, e.g. "
                                f"{'.'.join(parts[:i])}.0, or replace the whole list")
            annotation = typing.get_args(inner)[0]
        else:
            key = ".".join(parts)
            raise UserError(f"unknown key '{key}': '{'.'.join(parts[:i])}' is a value, not a section{_suggest(key)}")
    return annotation


def describe_keys() -> str:
    """One line per key: `key (type, default): description`, for --help."""
    lines = []

    def walk(model: type[BaseModel], prefix: str, defaults: Any) -> None:
        for name, field in model.model_fields.items():
            key, inner = prefix + name, _unwrap(field.annotation)
            if defaults is not None:
                default = getattr(defaults, name)
            else:
                default = field.get_default(call_default_factory=True)
            if _is_model(inner):
                lines.append(f"{key}: {field.description}")
                walk(inner, key + ".", default if isinstance(default, BaseModel) else None)
                continue
            shown = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            if isinstance(shown, list) and shown and isinstance(shown[0], BaseModel):
                shown = [s.model_dump(mode="json") for s in shown]
            type_name = re.sub(r"typing\.|posttrain\.config\.|<class '|'>", "", str(field.annotation))
            lines.append(f"  {key} ({type_name} = {shown!r}): {field.description}")

    walk(Config, "", Config.model_construct())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 as a float (YAML 1.1 insists on 1.0e-5)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML: '1e-5' -> 1e-05, '[a,b]' -> ['a', 'b'], 'null' -> None."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"value {text!r} is not valid YAML ({problem}); fix: quote it in the shell, e.g. "
                        "'rewards=[{name: math, weight: 1.0}]'") from None


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _recipe_path(recipe: str, relative_to: Path | None = None) -> Path:
    if recipe.endswith((".yaml", ".yml")) or os.sep in recipe:
        path = Path(recipe).expanduser()
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        if not path.is_file():
            raise UserError(f"recipe file '{recipe}' does not exist; fix: give a .yaml path or one of "
                            f"{', '.join(available_recipes())}")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(recipe, available_recipes(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown recipe '{recipe}'{hint}; available: {', '.join(available_recipes())} "
                        f"(in {RECIPES_DIR}), or recipe=path/to/file.yaml")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error ({problem}); fix: check indentation, colons and quoting "
                        "there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(recipe: str, _seen: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """The raw mapping of a recipe, its `base` chain merged in (the recipe's own keys win)."""
    path = _recipe_path(recipe, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise UserError(f"recipe inheritance loops: {chain}; fix: remove one of the `base:` keys")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data, path
    if not isinstance(base, str):
        raise UserError(f"{path}: `base` must be a recipe name or .yaml path, got {base!r}")
    parent, _ = read_recipe(base, (*_seen, path))
    return _deep_merge(parent, data), path


def _set(raw: dict, parts: list[str], value: Any, arg: str) -> None:
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = int(part)
            if index >= len(node):
                raise UserError(f"{arg}: '{'.'.join(parts[:i])}' has {len(node)} entries, so there is no "
                                f"entry {index}; fix: replace the whole list, e.g. {'.'.join(parts[:i])}=[...]")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if last:
            node[part] = value
        else:
            # A section that is null (model.teacher: null) or absent becomes a fresh mapping.
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def apply_overrides(raw: dict, args: list[str]) -> dict[str, str]:
    """Apply `key=value` arguments to a raw config mapping in place; returns key -> argument."""
    origins = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep:
            example = f"{arg}=<value>" if arg in all_keys() else "distill.lr=1e-5"
            raise UserError(f"argument '{arg}' is not key=value; fix: write it as {example} (no spaces "
                            "around '=')")
        if key.startswith("-") or not key:
            raise UserError(f"argument '{arg}': keys are written without dashes; fix: e.g. distill.lr=1e-5")
        parts = key.split(".")
        annotation = _unwrap(_leaf_type(parts))
        try:
            value = parse_value(text)
        except UserError as e:
            raise UserError(f"argument '{arg}': {e}") from None
        # A string field keeps the text as typed, so name=2024 or run_name=1.10 stay strings.
        if annotation is str and value is not None:
            value = text
        _set(raw, parts, value, arg)
        origins[key] = arg
    return origins


_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list, e.g. [a, b]", "dict_type": "a mapping, e.g. {k: v}",
    "model_type": "a mapping of its keys", "missing": "a value (it is required)",
}


def _example(key: str) -> str | None:
    """`key=<default>` when the key has a scalar default, for the fix part of a message."""
    node: Any = Config.model_construct()
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return None
        node = getattr(node, part)
    if isinstance(node, (bool, int, float, str)):
        return f"{key}={str(node).lower() if isinstance(node, bool) else node} (the default)"
    return None


def _explain(errors: list[dict], origins: dict[str, str], recipe: Path | None) -> str:
    lines = []
    for err in errors:
        key = ".".join(str(p) for p in err["loc"])
        args = [a for k, a in origins.items() if key and (key == k or key.startswith(k + ".") or k.startswith(key + "."))]
        if args:
            where = f"command line {' '.join(repr(a) for a in args)}"
        else:
            where = f"recipe {recipe}" if recipe else "config"
            if origins and not key:  # a rule across keys: any override may be the cause
                where += f" with {' '.join(repr(a) for a in origins.values())}"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' ({where}){_suggest(key)}")
        elif err["type"] == "missing":
            lines.append(f"'{key}' is required ({where}) but missing; fix: set {key}=...")
        elif err["type"] == "value_error":
            message = str(err["msg"]).removeprefix("Value error, ")
            prefix = f"{key}: " if key and key + "." not in message else ""
            lines.append(f"{prefix}{message} ({where})")
        else:
            expected = _EXPECTED.get(err["type"]) or str(err["msg"]).replace("Input should be", "").strip()
            if err["type"] == "literal_error":
                expected = "one of " + expected
            elif err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
                expected = "a value " + expected
            elif err["type"] == "string_pattern_mismatch":
                expected = "a name of letters, digits, '.', '_' and '-'"
            got = f"{value!r} ({type(value).__name__})" if not isinstance(value, (dict, list)) else \
                type(value).__name__
            fix = _example(key) or f"{key}=<{expected}>"
            lines.append(f"'{key}' expects {expected}, got {got} ({where}); fix: e.g. {fix}")
    return "\n".join(lines)


def build_config(raw: dict, origins: dict[str, str] | None = None, recipe: Path | None = None) -> Config:
    """Validate a raw mapping into a Config; every problem becomes one line of a UserError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain(e.errors(), origins or {}, recipe)) from None


def load_config(argv: list[str]) -> Config:
    """Config from command-line arguments: `recipe=NAME_OR_PATH` plus dotted `key=value` overrides."""
    recipes = [a for a in argv if a.startswith("recipe=")]
    if not recipes:
        raise UserError(f"no recipe given; fix: add recipe=NAME (one of {', '.join(available_recipes())}) "
                        "or recipe=path/to/file.yaml")
    if len(recipes) > 1:
        raise UserError(f"give one recipe, got {', '.join(recipes)}")
    raw, path = read_recipe(recipes[0].partition("=")[2])
    raw.setdefault("name", path.stem)
    origins = apply_overrides(raw, [a for a in argv if not a.startswith("recipe=")])
    return build_config(raw, origins, path)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in schema order; load_config(["recipe=<it>"]) reproduces it."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)


def print_config(cfg: Config) -> None:
    print(f"# resolved config: {cfg.name}\n{config_yaml(cfg)}", end="", flush=True)


def save_config(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Write resolved_config.yaml into run_dir (default: cfg.out_dir) and return its path."""
    out = Path(run_dir) if run_dir is not None else cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resolved_config.yaml"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(config_yaml(cfg))
    os.replace(tmp, path)
    return path


__all__ = [
    "Config", "ModelSpec", "RewardSpec", "load_config", "build_config", "read_recipe", "apply_overrides",
    "parse_value", "available_recipes", "all_keys", "describe_keys", "config_yaml", "print_config",
    "save_config", "RECIPES_DIR", "STAGE_ORDER",
]
