"""Stage `distill`: the student learns the teacher's next-token distribution (Gemma 3 report, section 2.2).

    summary = run_distill(cfg, student, teacher, tok)   # writes <run_dir>/<name>/distill/

Methods (`distill.method`):
- sampled (the report's): per token, `num_samples` ids drawn from the teacher's distribution, the
  target zero elsewhere and renormalised over them; student cross-entropy with its log-probs
  normalised over the full vocabulary (losses.chunked_sampled_distillation);
- topk: forward KL on the teacher's `top_k` ids (losses.chunked_topk_kl);
- on_policy: the student samples replies to the prompts with our sampler, the teacher scores them,
  and the student learns the sampled targets on its own samples.
Loss only on model turns. The teacher sees `distill.teacher_context` before each prompt (context
distillation) when it is set; the reply tokens, and so the positions trained, are the same for both.
Targets come from the teacher loaded beside the student, or (`cache_targets`) from shards the teacher
wrote once (targets.py), which the student streams. Every draw uses a generator seeded by
seeds.derive_seed(seed, what, global micro-batch) or (seed, what, example), so a resumed run draws the same targets.

Sequence parallelism (`distributed.sequence_parallel=N`, methods sampled and topk, text, no teacher context
or target cache): the N ranks of a group read the same rows; each pads them to a multiple of N, keeps its
1/N of the tokens (sequence_parallel.shard_batch) and draws the teacher targets of its own loss positions.

Logged: loss, lr, grad_norm, tokens/s, step time, peak memory, and on the held-out set (`data.eval`,
every `distill.eval_every` steps, before and after) the full-vocabulary KL(teacher || student) and
top-1 agreement. The final student is saved as an HF directory, <stage dir>/final.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import sequence_parallel as sp
from ..config import Config
from ..data import Example, has_images, load_rows, to_messages, tokenize_rows
from ..engine import Engine, Frozen, all_sum, broadcast_object, rank, world_size
from ..errors import UserError
from ..images import image_config
from ..loader import Batch, DataLoader, collate
from ..losses import chunked_sampled_distillation, chunked_topk_kl, distill_metrics, teacher_targets
from ..model import Gemma3
from ..sampler import Sampler
from ..seeds import derive_seed
from ..targets import TargetCache
from ..tracking import Tracker
from .loop import StageResult, StepLoop, finish, finished


# ----------------------------------------------------------------------------- data

def teacher_messages(row: dict, context: str | None, with_reply: bool = True) -> list[dict]:
    """The row as the teacher sees it: `context` before the first user turn ("{prompt}" in the context
    marks where the prompt goes; otherwise it is appended after a blank line)."""
    msgs = [dict(m) for m in to_messages(row, with_reply)]
    if context:
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        prompt = msgs[first]["content"]
        msgs[first]["content"] = (context.replace("{prompt}", prompt) if "{prompt}" in context
                                  else context.rstrip("\n") + "\n\n" + prompt)
    return msgs


def read_context(value: str | None) -> str | None:
    if value and value.endswith(".txt") and "\n" not in value:
        path = Path(value)
        if not path.is_file():
            raise UserError(f"distill.teacher_context: file {value} not found; fix: give the text itself or an "
                            "existing .txt path")
        return path.read_text()
    return value


def paired_examples(rows: list[dict], tok, max_seq_len: int, context: str | None, truncation: str = "drop",
                    with_reply: bool = True, images=None, stage: str = "distill") -> tuple[list[Example], list[Example]]:
    """Student and teacher examples of the same rows (data.tokenize_rows with the teacher's view); with
    images (images.ImageConfig), teacher and student examples hold the same pixels."""
    students = tokenize_rows(rows, tok, max_seq_len, truncation, require_reply=with_reply,
                             teacher=lambda row: teacher_messages(row, context, with_reply), key="data.max_seq_len",
                             images=images)
    if students.dropped and rank() == 0:
        print(f"{stage}: dropped {students.dropped} of {len(rows)} rows longer than data.max_seq_len={max_seq_len}")
    return students, students.paired


def load_split(source: str, key: str) -> list[dict]:
    import data as bundled  # the repository's data/ package: bundled generators by name

    try:
        return load_rows(source, registry=bundled.BUNDLED)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


# ----------------------------------------------------------------------------- targets

def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on the teacher's device (the sampling noise is drawn where the logits are)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def targets_for(teacher: Frozen, batch: Batch, cfg: Config, generator: torch.Generator):
    """Teacher targets (n, k) at the batch's loss positions, in their order (row-major)."""
    d = cfg.distill
    method = "topk" if d.method == "topk" else "sample"
    k = d.top_k if d.method == "topk" else d.num_samples
    kwargs = {} if method == "topk" else {"temperature": d.temperature, "generator": generator}

    def head(h, w):
        return teacher_targets(h[batch.loss_mask], w, k=min(k, w.shape[0]), method=method,
                               chunk_tokens=cfg.data.loss_chunk_tokens, **kwargs)

    return teacher(head, batch.ids, batch.positions, batch.segments, **batch.images)


def with_labels(ids: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, weight: float):
    """Sampled targets (n, K) with the label as one more column: (1 - weight) of each token's mass on the
    teacher's renormalised samples, `weight` on the label. The soft cross-entropy over these K + 1 columns is
    (1 - weight) x the distillation loss + weight x the label's cross-entropy, in the same head pass."""
    q = probs.float() / probs.float().sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.cat([ids.long(), labels.long()[:, None]], -1),
            torch.cat([q * (1 - weight), q.new_full((q.shape[0], 1), weight)], -1))


def student_loss(cfg: Config, batch: Batch, ids: torch.Tensor, values: torch.Tensor, normalizer: float):
    """fn(hidden, weight) for the engine: the distillation loss over the batch's loss positions."""
    chunk = cfg.data.loss_chunk_tokens

    if cfg.distill.label_weight:  # the config allows it with method=sampled only
        ids, values = with_labels(ids, values, batch.targets[batch.loss_mask], cfg.distill.label_weight)

    def fn(h, w):
        h = h[batch.loss_mask]
        if cfg.distill.method == "topk":
            return chunked_topk_kl(h, w, ids, values, chunk_tokens=chunk, normalizer=normalizer)
        return chunked_sampled_distillation(h, w, ids, values, chunk_tokens=chunk, normalizer=normalizer)

    return fn


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(student_call, teacher: Frozen, s_batches: list[Batch], t_batches: list[Batch], chunk: int,
             group=None) -> dict:
    """Full-vocabulary KL(teacher || student) and top-1 agreement over held-out batches (token-weighted,
    summed over ranks). group: the sequence-parallel group when the batches are shards of their rows."""
    kl = top1 = label = n = first = replies = 0.0
    for sb, tb in zip(s_batches, t_batches):
        starts = sp.first_of_runs(sb.loss_mask, group)  # each reply's first token
        right = []

        def inner(hs, ws):
            right.append(float((F.linear(hs[starts], ws).argmax(-1) == sb.targets[starts]).sum()))
            return teacher(lambda ht, wt: distill_metrics(hs[sb.loss_mask], ws, ht[tb.loss_mask], wt,
                                                          chunk_tokens=chunk, labels=sb.targets[sb.loss_mask]),
                           tb.ids, tb.positions, tb.segments, **tb.images)

        m = student_call(inner, sb.ids, sb.positions, sb.segments, **sb.images)
        kl, top1, n = kl + float(m.kl) * m.tokens, top1 + float(m.top1) * m.tokens, n + m.tokens
        label += float(m.label_top1) * m.tokens
        first, replies = first + right[0], replies + float(starts.sum())
    kl, top1, label, n, first, replies = all_sum([kl, top1, label, n, first, replies])
    # label_top1: the student's argmax is the data's own next token (teacher aside); reply_start_top1: the
    # same at each reply's first token (a one-word answer's accuracy)
    return {"eval/kl": kl / max(n, 1), "eval/top1": top1 / max(n, 1), "eval/label_top1": label / max(n, 1),
            "eval/reply_start_top1": first / max(replies, 1), "eval/tokens": n}


def eval_batches(students: list[Example], teachers: list[Example], cfg: Config, pad_id: int,
                 dp: tuple[int, int] | None = None):
    """The same held-out batches for student and teacher (one example per row, this rank's share).
    dp: (rank, world size) among data-parallel replicas (default: all ranks)."""
    (r, W), B = dp or (rank(), world_size()), cfg.data.micro_batch_size
    limit = cfg.distill.eval_batches * B * W
    idx = list(range(min(len(students), limit)))
    mine = idx[r::W]
    s_out, t_out = [], []
    for k in range(0, len(mine), B):
        rows = [[i] for i in mine[k:k + B]]
        s_out.append(collate(students, rows, max(len(students[i].ids) for (i,) in rows), pad_id))
        t_out.append(collate(teachers, rows, max(len(teachers[i].ids) for (i,) in rows), pad_id))
    return s_out, t_out


# ----------------------------------------------------------------------------- on-policy

def on_policy_batch(engine: Engine, prompts: list[Example], t_prompts: list[Example], batch: Batch, cfg: Config,
                    tok, seed: int) -> tuple[Batch, Batch]:
    """Replies sampled by the student to the batch's prompts; the (student, teacher) batches that hold them."""
    idx = [row[0] for row in batch.index if row]
    with engine.full_weights() as model:
        model.eval()
        out = Sampler(model).generate([prompts[i].ids for i in idx], max_new_tokens=cfg.distill.max_new_tokens,
                                      temperature=cfg.distill.temperature, stop_token_ids=tok.stop_ids, seed=seed)
        model.train()
    students, teachers = [], []
    for i, (c,) in zip(idx, out):
        reply = list(c.tokens)
        students.append(Example(prompts[i].ids + reply, [False] * len(prompts[i].ids) + [True] * len(reply)))
        teachers.append(Example(t_prompts[i].ids + reply, [False] * len(t_prompts[i].ids) + [True] * len(reply)))
    rows = [[j] for j in range(len(students))]
    return (collate(students, rows, max(len(e.ids) for e in students), tok.pad_id).to(engine.device),
            collate(teachers, rows, max(len(e.ids) for e in teachers), tok.pad_id).to(engine.device))


# ----------------------------------------------------------------------------- the stage

def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def run_distill(cfg: Config, student: Gemma3, teacher_model: Gemma3, tok, out_dir: Path | None = None, *,
                stage: str = "distill", exports: Callable[[Gemma3], dict] | None = None) -> StageResult:
    """Train the student on the teacher's distribution; returns <stage dir>/final and the summary
    (also <stage dir>/summary.json).

    stage: the name in logs, the tracker and seeds (the qat stage runs this loop as "qat").
    exports: called on rank 0 with the trained model (whole weights) before the final is written; what
    it returns goes into the summary under "exports" (the qat stage's GGUF and int4 files)."""
    d, data_cfg = cfg.distill, cfg.data
    out_dir = Path(out_dir or cfg.out_dir / stage)
    if (summary := finished(cfg, out_dir, d.steps, f"stage {stage}")) is not None:
        return StageResult(out_dir / "final", summary)
    context = read_context(d.teacher_context)
    on_policy = d.method == "on_policy"
    rows = load_split(data_cfg.train, "data.train")
    images = image_config(student.config, data_cfg.pan_and_scan)
    if images is not None and teacher_model.config.vision is None and any(map(has_images, rows)):
        raise UserError("data.train has images but the teacher is a text-only model; fix: a multimodal teacher "
                        "(teacher and student must see the same pixels), or text-only data")
    s_ex, t_ex = paired_examples(rows, tok, data_cfg.max_seq_len, context, data_cfg.truncation,
                                 with_reply=not on_policy, images=images, stage=stage)
    if on_policy and any(e.pixel_values is not None for e in s_ex):
        raise UserError(f"{stage}.method=on_policy does not take image prompts yet; fix: method=sampled or topk")
    e_s, e_t = paired_examples(load_split(data_cfg.eval, "data.eval"), tok, data_cfg.max_seq_len, context,
                               data_cfg.truncation, images=images, stage=stage) if data_cfg.eval else ([], [])
    sp.check_distill(cfg, d, stage, any(e.pixel_values is not None for e in s_ex + e_s))
    # Sequence parallelism: the N ranks of a group read the same rows and each computes 1/N of every row.
    group = sp.new_group(cfg.distributed.sequence_parallel)
    dp_rank, dp_world = sp.data_parallel(group)
    sp_rank = 0 if group is None else torch.distributed.get_rank(group)
    sp.apply(student, group)
    sp.apply(teacher_model, group)
    loader = DataLoader(s_ex, batch_size=data_cfg.micro_batch_size, max_seq_len=data_cfg.max_seq_len,
                        pad_id=tok.pad_id, seed=cfg.seed, packing=data_cfg.packing and not on_policy,
                        rank=dp_rank, world_size=dp_world)
    eval_s, eval_t = eval_batches(e_s, e_t, cfg, tok.pad_id, (dp_rank, dp_world)) if e_s else ([], [])

    engine = Engine(student, cfg, lr=d.lr, steps=d.steps, warmup_steps=d.warmup_steps, out_dir=out_dir,
                    shards_sequences=True)
    teacher = Frozen(teacher_model, cfg)
    eval_s = [sp.shard_batch(b, group, tok.pad_id).to(engine.device) for b in eval_s]
    eval_t = [sp.shard_batch(b, group, tok.pad_id).to(teacher.device) for b in eval_t]
    cache = None
    if d.cache_targets and not on_policy:
        cache = TargetCache.build(out_dir / "targets", teacher, t_ex, cfg, tok.pad_id)

    start, extra = engine.resume() if cfg.resume else (0, None)
    if extra:
        loader.load_state_dict(extra["loader"])
    tracker = Tracker(cfg.tracking, out_dir, config=cfg.model_dump(), name=f"{cfg.name}-{stage}", group=cfg.name)
    chunk = data_cfg.loss_chunk_tokens

    def held_out() -> dict:
        engine.model.eval()
        out = evaluate(engine.module, teacher, eval_s, eval_t, chunk, group)
        engine.model.train()
        return out

    before = (extra or {}).get("before") or {}
    if eval_s and not before:
        before = held_out()
        tracker.log(before, step=start)
        if rank() == 0:
            print(f"{stage}: held-out before: KL {before['eval/kl']:.4f}, top-1 {before['eval/top1']:.3f}")

    accum = data_cfg.grad_accum

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        rows = [next(loader) for _ in range(accum)]
        # non-padding tokens, counted once per SP group (the shards keep the full rows' segments)
        local_seen = sum(int((b.segments > 0).sum()) for b in rows) if sp_rank == 0 else 0
        micro = [sp.shard_batch(b, group, tok.pad_id).to(engine.device) for b in rows]
        if on_policy:
            pairs = [on_policy_batch(engine, s_ex, t_ex, b, cfg, tok,
                                     seed=derive_seed(cfg.seed, f"{stage}/on_policy", (step * accum + m) * world_size() + rank()))
                     for m, b in enumerate(micro)]
        else:
            pairs = [(b, b if context is None else _teacher_batch(b, t_ex, tok.pad_id).to(teacher.device))
                     for b in micro]
        local_tokens = sum(int(sb.loss_mask.sum()) for sb, _ in pairs)
        global_tokens = all_sum([float(local_tokens)])[0]
        # DeepSpeed scales each micro-batch's loss by 1/accum and averages gradients over ranks: dividing
        # by global_tokens / (accum * ranks) makes the step's gradient that of the mean over all its tokens.
        normalizer = max(global_tokens, 1.0) / (accum * world_size())
        loss_sum = 0.0
        for m, (sb, tb) in enumerate(pairs):
            if cache is not None:
                ids, values = (t.to(engine.device) for t in cache.batch(sb))
            else:
                # Keyed by the global micro-batch number (the loader's order), not by rank or accumulation
                # slot: W ranks x G accumulation steps draw the same targets as 1 rank x W*G.
                # Under sequence parallelism each shard of the micro-batch draws its own.
                global_batch = (step * accum + m) * dp_world + dp_rank
                key = (global_batch,) if group is None else (global_batch, sp_rank)
                ids, values = targets_for(teacher, tb, cfg, _generator(derive_seed(cfg.seed, f"{stage}/targets", *key), teacher.device))
            loss = engine.module(student_loss(cfg, sb, ids, values, normalizer), sb.ids, sb.positions, sb.segments,
                                 **sb.images)
            engine.backward(loss)
            info = engine.step()
            loss_sum += float(loss.detach()) * normalizer
        seconds = time.perf_counter() - t0
        loss_total, tokens_total, seen_total = all_sum([loss_sum, float(local_tokens), float(local_seen)])
        return {"loss": loss_total / max(tokens_total, 1), "lr": info["lr"], "grad_norm": info["grad_norm"],
                "tokens_per_s": seen_total / seconds, "loss_tokens": tokens_total, "step_seconds": seconds,
                "memory_gb": _peak_memory_gb(), "state_gb": engine.held_state_bytes() / 2**30}

    loop = StepLoop(stage, engine, tracker, cfg, d.steps, eval_every=d.eval_every,
                    evaluate=held_out if eval_s else None,
                    state=lambda: {"loader": loader.state_dict(), "before": before})
    last = loop.run(step_fn, start)

    after = {}
    if eval_s:
        engine.model.eval()
        after = evaluate(engine.module, teacher, eval_s, eval_t, chunk, group)
        tracker.log(after, step=d.steps)
    summary = {"steps": d.steps, "method": d.method, "final_loss": last.get("loss"),
               "before": before, "after": after}
    if exports is not None:
        with engine.full_weights() as model:
            written = exports(model) if rank() == 0 else None
        summary["exports"] = broadcast_object(written)
    engine.export_final(tok, out_dir / "final", summary)  # and <stage dir>/summary.json
    finish(engine, out_dir, d.steps, summary, state={"loader": loader.state_dict(), "before": before})
    if rank() == 0 and after:
        print(f"{stage}: held-out after {d.steps} steps: KL {before['eval/kl']:.4f} -> {after['eval/kl']:.4f}, "
              f"top-1 {before['eval/top1']:.3f} -> {after['eval/top1']:.3f}")
    tracker.finish()
    engine.close()
    teacher.close()
    sp.apply(student, None)  # the models leave the stage as they came: single-rank attention
    sp.apply(teacher_model, None)
    return StageResult(out_dir / "final", summary)


def _teacher_batch(batch: Batch, t_ex: list[Example], pad_id: int) -> Batch:
    """The teacher's batch for the same rows (its examples are longer by the context)."""
    width = max(1, *(sum(len(t_ex[i].ids) for i in row) for row in batch.index))
    return collate(t_ex, batch.index, width, pad_id)


__all__ = ["run_distill", "paired_examples", "teacher_messages", "evaluate"]
