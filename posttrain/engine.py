"""The training engine: DeepSpeed around the trained model, frozen models, step checkpoints, stop on SIGTERM.

    dist = init_distributed()                      # torchrun's env, or a world of 1 for plain python
    engine = Engine(student, cfg, lr=1e-5, steps=1000, warmup_steps=100, out_dir=run/"distill")
    start, extra = engine.resume() if cfg.resume else (0, None)
    for step in range(start, steps):
        for micro in micro_batches:
            loss = engine.module(fn, ids, positions, segments)   # fn(hidden, head_weight) -> loss
            engine.backward(loss)
        info = engine.step()                       # {"lr", "grad_norm"}
        if engine.should_save(step + 1): engine.save(step + 1, extra={...})
        if engine.stop_requested(): engine.save(step + 1, ...); break

The trained model runs inside a DeepSpeed engine with the recipe's ZeRO stage (0-3) and its
`distributed.ds_config` merged over the generated config. CPU runs set DS_ACCELERATOR=cpu and use
gloo; plain `python train.py` gets a one-process world on a free local port. Losses are computed
from final hidden states and the tied output weight in the same forward (`WithHead`), so ZeRO-3
gathers the embedding for the head too. Frozen models (teacher, reference) run inference-only:
replicated, or partitioned by ZeRO-3 (`Frozen`) when the recipe shards weights.

Checkpoints: <out_dir>/checkpoints/step_<k>/ holds DeepSpeed's model and optimizer shards, the LR
schedule, each rank's RNG states and the caller's `extra` (data position, metrics). A checkpoint
is written to step_<k>.partial and renamed when every rank has finished, and `latest` is replaced
atomically after that, so a kill during a save leaves the previous checkpoint usable. The last
`checkpoint.keep` are kept.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import random
import shutil
import signal
import socket
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import atomic_write
from .config import Config
from .errors import Preempted, UserError
from .model import Gemma3

LATEST = "latest"
# DeepSpeed 0.19 calls torch.distributed's renamed collectives on every ZeRO-3 gather: not ours to fix.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                        category=FutureWarning)


# ----------------------------------------------------------------------------- process group

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group (or make a world of one); returns (rank, world_size).

    Without CUDA, DeepSpeed is pointed at its CPU accelerator (DS_ACCELERATOR=cpu) and the gloo
    backend before it is imported; nothing needs to be set by hand."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    alone = "WORLD_SIZE" not in os.environ  # plain `python train.py`: a world of one
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    import deepspeed

    if alone and not dist.is_initialized():
        # An in-memory store: a world of one needs no TCP rendezvous (and cannot lose a port race).
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's (picklable) object, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- modules

class WithHead(nn.Module):
    """A Gemma 3 model whose forward ends in a function of its final hidden states and its tied output
    weight: forward(fn, ids, positions, segments) = fn(hidden (B, T, C), weight (V, C)).

    Under ZeRO-3 the embedding is registered as an external parameter of this module, so it stays
    gathered for `fn` (the chunked losses) in the forward and the backward."""

    def __init__(self, model: Gemma3, autocast: torch.dtype | None = None):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, fn: Callable, ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, image_index: torch.Tensor | None = None, **images):
        """images: pixel_values / token_type_ids / image_features, as Gemma3.hidden_states takes them.
        image_index (N,): the batch's N image blocks show pixel_values[image_index]; several rows that
        share an image (a group of samples of one prompt) then encode it once."""
        with torch.autocast(ids.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            if image_index is not None:
                images["image_features"] = self.model.image_features(images.pop("pixel_values"))[image_index]
            h = self.model.hidden_states(ids, positions=positions, segments=segments, **images)
            if h.device.type == "cpu":  # the forward's freed temporaries, before fn's large logits chunks
                release_host_memory()
            return fn(h, self.model.head_weight())  # fake-quantized under QAT's embedding option


def _register_head(module: WithHead) -> None:
    import deepspeed

    deepspeed.zero.register_external_parameter(module, module.model.embed_tokens.weight)


def _sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _rebuild_persistent(p: torch.Tensor) -> None:
    """After this rank's ZeRO-3 part changed: a parameter small enough to stay whole on every rank
    (persistent) gets its whole value rebuilt from the ranks' parts, so the next forward sees the change."""
    if getattr(p, "ds_persist", False) and p.data.numel() == p.ds_numel:
        parts = [torch.empty_like(p.ds_tensor) for _ in range(world_size())]
        dist.all_gather(parts, p.ds_tensor)
        p.data.copy_(torch.cat(parts)[:p.ds_numel].view(p.data.shape))


def release_host_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op).

    On CPU the tensors under glibc's mmap threshold (32 MiB at most: activations of a few thousand
    tokens, per-matrix gradients and Adam states) live on the heap, and a forward or a training step
    frees them in an order that leaves holes the heap cannot shrink past. The large buffers that come
    next (the 1 GiB logits chunks, mmapped) cannot use those holes, so the resident set grows past the
    planned peak. Called after each forward's hidden states (before the head) and each optimizer step;
    on the 270M at T = 8,192 (distill, steady state) it takes the peak RSS from 8.13 to 6.29 GiB
    against the planner's 6.12, for milliseconds per call against a step of minutes."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def grad_norm(parameters) -> float:
    """The L2 norm of all the gradients, as torch.nn.utils.clip_grad_norm_ computes it: each tensor's norm
    in its own dtype (no copy: a float64 one of the 270M's embedding gradient alone is 1.3 GB), those
    combined in float64."""
    norms = [torch.linalg.vector_norm(p.grad.detach()).double() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def freeze(model: Gemma3, cfg: Config) -> None:
    """What a trained stage leaves as loaded: the embedding (model.freeze_embeddings), the vision tower
    and the projector (unless model.train_vision_tower / model.train_projector)."""
    if cfg.model.freeze_embeddings:
        model.embed_tokens.weight.requires_grad_(False)
    if model.is_multimodal:
        model.vision_tower.requires_grad_(cfg.model.train_vision_tower)
        model.multi_modal_projector.requires_grad_(cfg.model.train_projector)


def dedupe_root(cfg: Config) -> Path | None:
    """Where final models may share files (checkpoint.save_pretrained's dedupe_within): the run directory
    when the embedding stays frozen through every stage, so each stage's copy of it is the same bytes."""
    return cfg.out_dir if cfg.model.freeze_embeddings else None


def default_warmup(steps: int, warmup_steps: int | None) -> int:
    """A stage's warm-up: the recipe's, else min(steps // 10, 50)."""
    return min(steps // 10, 50) if warmup_steps is None else warmup_steps


def lr_lambda(steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 to the peak over warmup_steps, then cosine decay to 10% of it at `steps`."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def ds_config(cfg: Config, *, lr: float, grad_accum: int, train: bool = True) -> dict:
    """The generated DeepSpeed config, with the recipe's distributed.ds_config merged over it."""
    d = cfg.distributed
    on_gpu = torch.cuda.is_available()
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": d.grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": on_gpu and cfg.model.student.dtype == "bfloat16"},
    }
    if train:
        # torch_adam: torch's AdamW (DeepSpeed's fused CPU Adam needs a C++ build at first use), with its
        # fused CPU kernel: on the 270M's embedding 12x faster than the default per-tensor loop, and without
        # its two parameter-sized temporaries (1.3 GB there).
        params = {"lr": lr, "betas": list(d.adam_betas), "eps": d.adam_eps, "weight_decay": d.weight_decay}
        conf["optimizer"] = {"type": "AdamW", "params": params if on_gpu else {**params, "torch_adam": True,
                                                                                "fused": True}}
        if d.offload_optimizer:
            conf["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if d.zero_stage == 3:
        # Small tensors (norms) stay whole on every rank: gathering them costs more than they weigh.
        conf["zero_optimization"].update(stage3_param_persistence_threshold=10_000,
                                         stage3_gather_16bit_weights_on_model_save=False)
    return _merge(conf, d.ds_config)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------- the engine

class Held:
    """A model held for computing (the base of Engine and Frozen): its module, its shards, gathering
    them, writing into them and exporting. Subclasses set self.wrapped (the module, WithHead around a
    Gemma3) and self.engine (the DeepSpeed engine, or None when the module runs as it is)."""

    wrapped: nn.Module
    engine: Any = None

    @property
    def module(self) -> nn.Module:
        """Call it like WithHead: module(fn, ids, positions, segments) (or the given module's own forward)."""
        return self.engine if self.engine is not None else self.wrapped

    @property
    def device(self) -> torch.device:
        """Where the model computes: batches go here (the stages build them on the CPU)."""
        return next(self.wrapped.parameters()).device

    @property
    def model(self) -> nn.Module:
        """The Gemma3 held (or the module given, when it was not one)."""
        return self.wrapped.model if isinstance(self.wrapped, WithHead) else self.wrapped

    def local_shards(self) -> dict[str, torch.Tensor]:
        """name -> the part of each parameter this rank holds: its ZeRO-3 partition, else the whole tensor.
        Views, not copies: writing into them changes the model."""
        return {name: (p.ds_tensor if _sharded(p) else p.data) for name, p in self.wrapped.named_parameters()}

    @torch.no_grad()
    def assign_local(self, shards: dict[str, torch.Tensor], *, refresh_master: bool = True) -> None:
        """Write new values into the parts of the parameters this rank holds (local_shards' layout).
        Under ZeRO-3, parameters small enough to stay whole on every rank (persistent) also get their
        whole value rebuilt from the ranks' new parts, so the next forward sees the change.

        refresh_master: also copy them into the optimizer's float32 master weights (ZeRO 1-3 keep
        their own), so training continues from the new values. A temporary swap that puts the old
        values back before the next step (the EMA anchor) passes False: a bf16 round trip through
        the master copy would lose its low bits."""
        for name, p in self.wrapped.named_parameters():
            if not _sharded(p):
                p.data.copy_(shards[name])
                continue
            p.ds_tensor.copy_(shards[name])
            _rebuild_persistent(p)
        refresh = getattr(getattr(self.engine, "optimizer", None), "refresh_fp32_params", None)
        if refresh_master and refresh is not None:
            refresh()

    @torch.no_grad()
    def swap_local(self, shards: dict[str, torch.Tensor], *, slice_elems: int = 1 << 24) -> None:
        """Exchange the values of the parts of the parameters this rank holds with `shards` (local_shards'
        layout and dtypes), in place, a slice at a time: 64 MiB of scratch instead of a copy of the model
        (the 270M's float32 weights are 1.07 GB). A second swap puts both back bit for bit. The optimizer's
        master weights are left alone (assign_local's refresh_master=False): swap back before a step."""
        for name, p in self.wrapped.named_parameters():
            mine, other = (p.ds_tensor if _sharded(p) else p.data), shards[name]
            if mine.dtype != other.dtype or mine.shape != other.shape or not (mine.is_contiguous()
                                                                               and other.is_contiguous()):
                raise ValueError(f"swap_local: {name} is {mine.dtype} {tuple(mine.shape)}, the shard given "
                                 f"{other.dtype} {tuple(other.shape)}; both must match and be contiguous "
                                 "(assign_local converts)")
            a, b = mine.view(-1), other.view(-1)
            for s in range(0, a.numel(), slice_elems):
                scratch = a[s:s + slice_elems].clone()
                a[s:s + slice_elems].copy_(b[s:s + slice_elems])
                b[s:s + slice_elems].copy_(scratch)
            if _sharded(p):
                _rebuild_persistent(p)

    @contextlib.contextmanager
    def full_weights(self):
        """Whole weights on every rank for the duration (the sampler's rollouts), then back to shards.
        A no-op unless ZeRO-3 partitions the weights."""
        params = [p for p in self.wrapped.parameters() if _sharded(p)]
        if not params:
            yield self.model
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield self.model

    def _release_weights(self) -> None:
        """Drop the module's tensors (after the DeepSpeed engine is destroyed): the module is unusable after."""
        for param in self.wrapped.parameters():
            param.grad = None
            param.data = torch.empty(0, dtype=param.dtype)
            if _sharded(param):
                param.ds_tensor = torch.empty(0, dtype=param.dtype)
        self.engine = None
        gc.collect()

    def export_final(self, tok, path: Path, summary: dict) -> None:
        """The model as an HF directory at `path` and the stage's summary beside it
        (path.parent / summary.json), written by rank 0 from the gathered weights. With a frozen
        embedding (model.freeze_embeddings), it is written to a file of its own, which is a hard link
        to the previous stage's identical file: the run directory stores it once."""
        with self.full_weights() as model:
            if rank() == 0:
                from .checkpoint import save_pretrained

                save_pretrained(model, tok, path, dtype=model.embed_tokens.weight.dtype,
                                dedupe_within=dedupe_root(self.cfg))
                write_json_atomic(path.parent / "summary.json", summary)
        barrier()


class Engine(Held):
    """The trained model under DeepSpeed, with its optimizer, LR schedule and checkpoints."""

    def __init__(self, model: Gemma3 | nn.Module, cfg: Config, *, lr: float, steps: int, warmup_steps: int,
                 out_dir: Path, grad_accum: int | None = None, shards_sequences: bool = False):
        """model: a Gemma3 (wrapped in WithHead: the engine's forward is fn(hidden, head_weight)), or any
        module whose `.model` (or itself) is trained as given, e.g. a reward model.
        shards_sequences: the caller feeds sequence-parallel shards (distributed.sequence_parallel > 1 is
        refused otherwise)."""
        import deepspeed

        from .sequence_parallel import check_trainable

        if not shards_sequences:  # library callers of any stage, too
            check_trainable(cfg, [f"the engine of {Path(out_dir).name}"])
        self.cfg, self.steps, self.out_dir = cfg, steps, Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        backbone = model if isinstance(model, Gemma3) else getattr(model, "backbone", None)
        if backbone is not None:
            freeze(backbone, cfg)
        if backbone is not None:
            backbone.activation_checkpointing = cfg.distributed.activation_checkpointing
            if cfg.distributed.compile:
                for block in backbone.layers:
                    block.compile()
        autocast = torch.bfloat16 if cfg.distributed.autocast == "bf16" else None
        self.wrapped = WithHead(model.train(), autocast) if isinstance(model, Gemma3) else model.train()
        conf = ds_config(cfg, lr=lr, grad_accum=grad_accum or cfg.data.grad_accum)
        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, warmup_steps))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.wrapped, model_parameters=[p for p in self.wrapped.parameters() if p.requires_grad],
            config=conf, lr_scheduler=scheduler)
        if cfg.distributed.zero_stage == 3 and isinstance(self.wrapped, WithHead):
            _register_head(self.wrapped)
        self._stop = False
        self.resumed_rank_state: dict | None = None
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) \
            if threading_main() else None

    # --- training

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    def backward(self, loss: torch.Tensor, *, part_of_sum: bool = False) -> None:
        """part_of_sum: the loss is one part of the accumulated step's loss (the parts sum to it), not one
        micro-batch's mean, so DeepSpeed does not divide it by the accumulation steps."""
        self.engine.backward(loss, scale_wrt_gas=not part_of_sum)

    def step(self) -> dict[str, float]:
        """Finish the micro-batch (DeepSpeed steps the optimizer at accumulation boundaries). grad_norm: the
        global gradient norm before clipping, of the last optimizer step."""
        # ZeRO 1-3 (and DeepSpeed's bf16/fp16 wrappers) report the norm they clip with; ZeRO 0 clips the
        # bare optimizer's gradients and reports nothing. Its gradients are all-reduced (whole on every
        # rank) once the boundary's backward is done, so this rank's norm of them is the global one.
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.cfg.distributed.zero_stage == 0:
            self._zero0_norm = grad_norm(self.wrapped.parameters())
        self.engine.step()
        if boundary and self.device.type == "cpu":
            release_host_memory()
        norm = self.engine.get_global_grad_norm()
        norm = getattr(self, "_zero0_norm", None) if norm is None else norm
        return {"lr": self.scheduler.get_last_lr()[0] if self.scheduler else float("nan"),
                "grad_norm": float(norm) if norm is not None else float("nan")}

    def held_state_bytes(self) -> int:
        """Bytes of parameters, gradients and optimizer states this rank holds (each storage once)."""
        seen: dict[int, int] = {}

        def add(t):
            if isinstance(t, torch.Tensor) and t.numel():
                s = t.untyped_storage()
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
            elif isinstance(t, (list, tuple)):
                for x in t:
                    add(x)
            elif isinstance(t, dict):
                for x in t.values():
                    add(x)

        for p in self.wrapped.parameters():
            add(p.ds_tensor if _sharded(p) else p.data)
            add(p.grad)
        opt = self.optimizer
        for obj in (opt, getattr(opt, "optimizer", None)):
            if obj is None:
                continue
            add(list(vars(obj).values()))
            add(list(getattr(obj, "state", {}).values()))
        return sum(seen.values())

    # --- checkpoints

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return step == self.steps or (every > 0 and step % every == 0)

    def save(self, step: int, extra: dict | None = None, rank_state: dict | None = None) -> Path:
        """Write checkpoint step_<step> (all ranks call this), atomically, and prune old ones.
        rank_state: this rank's own tensors to keep with it (e.g. its part of an EMA anchor);
        `resume` gives it back in `self.resumed_rank_state`."""
        tag, final = f"step_{step}.partial", self.ckpt_dir / f"step_{step}"
        if rank() == 0 and (self.ckpt_dir / tag).exists():
            shutil.rmtree(self.ckpt_dir / tag)
        barrier()
        client = {"step": step, "extra": extra or {}, "scheduler": self.scheduler.state_dict()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        torch.save(_rng_state(), self.ckpt_dir / tag / f"rng_rank{rank()}.pt")
        if rank_state is not None:
            torch.save(rank_state, self.ckpt_dir / tag / f"state_rank{rank()}.pt")
        barrier()
        if rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.ckpt_dir / tag, final)
            atomic_write(self.ckpt_dir / LATEST, lambda tmp: tmp.write_text(final.name))
            done = sorted(self._checkpoints(), key=lambda p: int(p.name.split("_")[1]))
            for old in done[:-self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def _checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return [p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                and p.name.split("_")[1].isdigit()]

    def latest(self) -> Path | None:
        marker = self.ckpt_dir / LATEST
        if not marker.exists():
            return None
        path = self.ckpt_dir / marker.read_text().strip()
        if not path.is_dir():
            raise UserError(f"{marker} names {path.name}, which is missing; fix: delete {marker} to start "
                            f"over, or restore {path}")
        return path

    def resume(self) -> tuple[int, dict | None]:
        """Load the latest checkpoint if there is one: (its step, its extra), else (0, None)."""
        path = self.latest()
        if path is None:
            return 0, None
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise UserError(f"could not read the checkpoint {path}; fix: delete it (the previous one is kept)")
        self.scheduler.load_state_dict(client["scheduler"])
        rng = path / f"rng_rank{rank()}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        own = path / f"state_rank{rank()}.pt"
        self.resumed_rank_state = torch.load(own, weights_only=True) if own.exists() else None
        return int(client["step"]), client.get("extra")

    # --- stopping

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM (checked once per step, all ranks agree)."""
        return all_sum([float(self._stop)])[0] > 0

    def preempt(self, name: str, step: int, *closing: Callable[[], object]) -> None:
        """After SIGTERM and the checkpoint of `step`: run the stage's closers (progress bar, tracker),
        close this engine, and raise Preempted, which train.py turns into exit status 0."""
        for close in closing:
            close()
        self.close()
        raise Preempted(f"{name}: SIGTERM: saved step {step} in {self.ckpt_dir}; resume with resume=true")

    def close(self) -> None:
        """Give back the SIGTERM handler and the memory: DeepSpeed's hooks and buffers keep the model,
        its gradients and the optimizer states alive otherwise (a stage that trains several models in
        turn, like WARM's members, would hold all of them)."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
            # Something inside DeepSpeed outlives destroy() and keeps the optimizer alive, so its tensors
            # and the module's are dropped by hand: the module is unusable after close (save it first).
            for obj in (self.optimizer, getattr(self.optimizer, "optimizer", None)):
                for key, value in list(vars(obj).items()) if obj is not None else ():
                    if isinstance(value, torch.Tensor):
                        setattr(obj, key, None)
                    elif isinstance(value, list) and any(isinstance(v, (torch.Tensor, list)) for v in value):
                        setattr(obj, key, [])
                    elif isinstance(value, dict) and key == "state":
                        value.clear()
            self.optimizer = self.scheduler = None
            self._release_weights()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- frozen models

class Frozen(Held):
    """A model that is only evaluated, averaged into or exported, never trained (the teacher, WARP's
    evaluation copy, WARM's average): no gradients, no optimizer state. Replicated, or partitioned by
    ZeRO-3 when the recipe shards weights, in the same layout as a trained engine's shards.

    frozen(fn, ids, positions, segments) = fn(hidden, head_weight) under no_grad, like WithHead (a
    module that is not a Gemma3, e.g. a reward model, is called with its own arguments).

    like_trained: hold the weights in a trained Engine's layout (partitioned whenever the recipe uses
    ZeRO-3, even on one rank), so shards move between the two (assign_local, local_shards); else a
    one-rank world keeps them whole."""

    def __init__(self, model: Gemma3 | nn.Module, cfg: Config, *, like_trained: bool = False):
        model.eval().requires_grad_(False)
        self.cfg = cfg
        self.wrapped = WithHead(model) if isinstance(model, Gemma3) else model
        self.engine = None
        if cfg.distributed.zero_stage == 3 and (world_size() > 1 or like_trained):
            import deepspeed

            conf = ds_config(cfg, lr=0.0, grad_accum=1, train=False)
            self.engine, *_ = deepspeed.initialize(model=self.wrapped, config=conf)
            if isinstance(self.wrapped, WithHead):
                _register_head(self.wrapped)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def close(self) -> None:
        """Let go of the weights (DeepSpeed's hooks keep them alive otherwise)."""
        if self.engine is not None:
            self.engine.destroy()
        self._release_weights()


# ----------------------------------------------------------------------------- helpers

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


__all__ = ["Held", "Engine", "Frozen", "WithHead", "init_distributed", "ds_config", "lr_lambda", "all_sum", "barrier",
           "rank", "world_size", "write_json_atomic"]
