"""The RL plumbing J-BOND (policy.py) and WARP (policy_warp.py) share: prompts and their reward
columns, scoring, rollouts from our sampler on the engine's gathered weights, sequence log-probs,
the EMA anchor held as this rank's shards, the held-out evaluation, and the step loop of one RL run
(progress bar, evaluation every policy.eval_every steps, logging, checkpoints, SIGTERM).
The algorithms themselves are pure and live in bond.py, warp.py, pg.py and merge.py.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from pathlib import Path

import torch

from ..config import Config
from ..data import Example, has_images, origin, to_messages
from ..engine import Engine, all_sum, rank, world_size
from ..errors import UserError
from ..images import ImageConfig, encode_chat, preprocess, row_images
from ..loader import collate
from ..losses import sequence_logprobs, weighted_logprobs
from ..merge import ema_
from ..sampler import Sampler
from ..seeds import derive_seed
from ..tracking import Tracker
from .loop import StepLoop


# ----------------------------------------------------------------------------- prompts and rewards

class Prompts:
    """Tokenized prompts with their reward columns; a seeded order, this rank's share per step.

    images: how a multimodal policy reads images (images.ImageConfig; None for a text-only one). A row
    with images (TRL's vision format, as in data) gets its image blocks in `ids`; its pixel values are
    made again from the files when `pixels(i)` asks (the last few are kept: a step asks for its prompts'
    images several times), so a large prompt set holds ids, not images."""

    def __init__(self, rows: list[dict], tok, key: str, images: ImageConfig | None = None):
        if not rows:
            raise UserError(f"{key} is empty; the policy stage needs prompts")
        self.rows, self.tok, self.image_cfg = rows, tok, images
        self.with_images = [has_images(r) for r in rows]
        if any(self.with_images) and images is None:
            i = self.with_images.index(True)
            raise UserError(f"{origin(rows, i)} ({key}): the row has images but the policy is text-only; fix: use a "
                            "multimodal model (Gemma 3 4B, 12B, 27B, or model.student.vision), or drop the images")
        try:
            self.ids = [list(self._encode(i).ids) for i in range(len(rows))]
        except (KeyError, TypeError) as e:
            raise UserError(f"{key}: every row needs a `prompt` (or `messages`); {e}") from None
        self.text = [_prompt_text(r) for r in rows]
        self._pixels = functools.lru_cache(maxsize=16)(self._load_pixels)

    def _encode(self, i: int):
        messages = to_messages(self.rows[i], with_reply=False)
        if not self.with_images[i]:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True)
        where = origin(self.rows, i)
        return encode_chat(self.tok, messages, row_images(self.rows[i], where), self.image_cfg,
                           add_generation_prompt=True)

    def pixels(self, i: int) -> torch.Tensor | None:
        """Prompt i's pixel values (N, 3, H, W), its images and crops in block order; None without images."""
        return self._pixels(i) if self.with_images[i] else None

    def _load_pixels(self, i: int) -> torch.Tensor:
        return preprocess(row_images(self.rows[i], origin(self.rows, i)), self.image_cfg)[0]

    @property
    def has_images(self) -> bool:
        return any(self.with_images)

    def batch(self, step: int, size: int, seed: int) -> list[int]:
        """This rank's `size` prompt indices for global step `step` (epochs reshuffled by seed)."""
        per_step = size * world_size()
        epoch_len = max(1, len(self.rows) // per_step)
        epoch, k = divmod(step, epoch_len)
        order = list(range(len(self.rows)))
        random.Random(derive_seed(seed, "rl/prompt_order", epoch)).shuffle(order)
        first = k * per_step + rank() * size
        return [order[(first + j) % len(order)] for j in range(size)]

    def columns(self, idx: list[int], repeat: int) -> dict[str, list]:
        keys = sorted({k for i in idx for k in self.rows[i]} - {"prompt", "messages", "response", "solution", "system"})
        return {k: [self.rows[i].get(k) for i in idx for _ in range(repeat)] for k in keys}


def _prompt_text(row: dict) -> str:
    """What a reward reads as the prompt: the `prompt`, or the last message's text (its text parts joined)."""
    if row.get("prompt"):
        return row["prompt"]
    content = row["messages"][-1]["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def score(reward, prompts: Prompts, idx: list[int], completions: list[list[str]]):
    """Rewards (P, n) as a tensor (NaN where a reward skipped the sample) and the reward's metrics.
    Every rank calls it together: a reward that stops the run (on_error: raise, a broken contract)
    on one rank stops every rank with the same error, instead of leaving the others in a collective."""
    from rewards.base import RewardError

    n = len(completions[0])
    flat = [c for row in completions for c in row]
    texts = [prompts.text[i] for i in idx for _ in range(n)]
    try:
        out, failure = reward.score(texts, flat, **prompts.columns(idx, n)), None
    except RewardError as e:
        out, failure = None, str(e)
    if failure := _first_of_ranks(failure):
        raise UserError(f"{failure}. The last step checkpoint stays usable (resume=true after the fix)")
    total = torch.tensor([float("nan") if t is None else t for t in out.total]).view(len(idx), n)
    return total, out


def _first_of_ranks(message: str | None) -> str | None:
    """The first rank's message, when any rank has one (every rank calls this)."""
    if world_size() == 1:
        return message
    import torch.distributed as dist

    every: list = [None] * world_size()
    dist.all_gather_object(every, message)
    return next((m for m in every if m), None)


class RewardHealth:
    """Stops an RL run that trains on nothing (README, "Rewards: when they fail"): when a reward scored no
    sample of a step, every call of it having raised or timed out, for policy.rewards_max_failed_steps
    consecutive steps, or when no sample of as many consecutive steps got a total. Reads a step's metrics
    averaged over the ranks, so every rank decides the same; the message is the first rank's."""

    def __init__(self, name: str, reward, cfg: Config, samples_per_step: int):
        self.name, self.reward, self.limit, self.n = name, reward, cfg.policy.rewards_max_failed_steps, samples_per_step
        self.keys = [m.key for m in reward.members]
        self.streak = {key: 0 for key in [*self.keys, "total"]}

    def after_step(self, step: int, metrics: dict, engine: Engine) -> None:
        failed = {key: metrics.get(f"reward/{key}/errors", 0) + metrics.get(f"reward/{key}/timeouts", 0) >= self.n
                  for key in self.keys}
        failed["total"] = metrics.get("reward/total/skipped", 0) >= self.n
        for key, bad in failed.items():
            self.streak[key] = self.streak[key] + 1 if bad else 0
        over = [k for k in [*self.keys, "total"] if self.streak[k] >= self.limit]
        last = _first_of_ranks("; ".join(f"{k}: {self.reward.last_errors[k]}" for k in self.keys
                                         if k in self.reward.last_errors) or None) if over else None
        if not over:
            return
        first, done = step + 2 - self.limit, step + 1
        latest = engine.latest()
        kept = f"the last step checkpoint ({latest}) stays usable" if latest else "no step checkpoint was written yet"
        key = over[0]
        what = (f"reward '{key}' scored no sample" if key != "total" else "no sample got a reward total (all skipped)")
        raise UserError(
            f"{self.name}: {what} in {self.limit} consecutive steps ({first}-{done}, {self.n} samples each); "
            f"last error: {last or 'none recorded'}; {kept}; fix: run the reward alone on a few completions "
            "(rewards.get(name)(prompts, completions, **columns)), raise its timeout_s, or, if failures are "
            "expected, raise policy.rewards_max_failed_steps")


# ----------------------------------------------------------------------------- rollouts and log-probs

class Rollout(list):
    """Completions' token ids, out[prompt][sample], plus `entropy`: the mean over sampled tokens of
    -log pi(token) at temperature 1 (a per-token entropy estimate when sampling at temperature 1), and
    `stopped`: the share of completions that ended on a stop token rather than at max_new_tokens
    (`finished`: that, per completion, prompt-major),
    `logprobs`: the sampler's log pi(token) per token, out[prompt][sample][t] (temperature 1)."""

    entropy: float = float("nan")
    logprobs: list = []

    def sequence_logprobs(self) -> torch.Tensor:
        """The sampler's log pi(y) per completion, (P, n) float64."""
        return torch.tensor([[sum(lp) for lp in row] for row in self.logprobs], dtype=torch.float64)
    stopped: float = float("nan")


def stop_ids(cfg: Config, tok) -> tuple[int, ...]:
    """<eos>, <end_of_turn> and every token holding one of policy.stop."""
    return tuple(tok.stop_ids) + tok.ids_containing(cfg.policy.stop)


def rollout(engine: Engine, prompts: Prompts, idx: list[int], n: int, cfg: Config, tok, seed: int,
            temperature: float | None = None) -> Rollout:
    p = cfg.policy
    with engine.full_weights() as model:
        was = model.training
        model.eval()
        images = [prompts.pixels(i) for i in idx] if prompts.has_images else None
        # the training forward's precision (distributed.autocast), so the samples' log-probs are its own
        device = model.embed_tokens.weight.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.distributed.autocast == "bf16"):
            out = Sampler(model).generate([prompts.ids[i] for i in idx], n=n, max_new_tokens=p.max_new_tokens,
                                          temperature=p.temperature if temperature is None else temperature,
                                          stop_token_ids=stop_ids(cfg, tok), seed=seed, images=images)
        model.train(was)
    result = Rollout([list(c.tokens) for c in row] for row in out)
    result.logprobs = [[list(c.logprobs) for c in row] for row in out]
    lps = [lp for row in out for c in row for lp in c.logprobs]
    result.entropy = -sum(lps) / len(lps) if lps else float("nan")
    result.finished = [c.finish_reason == "stop" for row in out for c in row]  # per sample, prompt-major
    result.stopped = sum(result.finished) / len(result.finished)
    return result


def seq_logprobs(engine: Engine, prompts: Prompts, idx: list[int], completions: list[list[list[int]]], cfg: Config,
                 pad_id: int):
    """log pi(y) per completion, (P, n), through the engine (grad unless under no_grad).
    A prompt's images are encoded once for its n completions (engine.module's image_index)."""
    n, chunk = len(completions[0]), cfg.data.loss_chunk_tokens

    def per_sequence(h, w, targets, mask):
        return sequence_logprobs(h, w, targets, mask, chunk).sum(-1).view(len(idx), n)

    return _completion_forward(engine, prompts, idx, completions, cfg, pad_id, per_sequence)


def loss_passes(cfg: Config, rows_per_prompt: int) -> int:
    """Forward/backward passes per optimizer step: the policy engine's gradient accumulation steps."""
    return -(-cfg.data.micro_batch_size // cfg.policy.prompts_per_pass(cfg.data.micro_batch_size, rows_per_prompt))


def linear_loss_step(engine: Engine, prompts: Prompts, idx: list[int], completions: list[list[list[int]]],
                     cfg: Config, pad_id: int, loss_of, sampled_lp: torch.Tensor) -> tuple[float, dict, dict]:
    """Backward and optimizer step of loss_of(log pi(y)), lp (P, n) -> (loss, stats), in passes of
    policy.rows_per_pass rows. The RL losses here (REINFORCE, WARP, J-BOND) are linear in the sequence
    log-probs, their coefficients functions of detached values only, so the step's gradient is
    sum_i (d loss / d lp_i) grad lp_i, a sum over rows: each pass backpropagates its rows' share and
    the engine accumulates them (its gradient accumulation steps: loss_passes) into one optimizer step.
    The coefficients are taken at sampled_lp, the sampler's log pi(y) (the training forward's own, within
    1e-5 in float32: tests/test_logprob_agreement.py). Known before the forward, they make each pass's
    head fused (losses.weighted_logprobs: 3 head GEMMs, not 4). The loss and stats returned are loss_of at
    the training forward's log-probs, as one pass would report them. Returns (loss, stats, engine.step's info)."""
    leaf = sampled_lp.detach().double().clone().requires_grad_(True)
    coeff = torch.autograd.grad(loss_of(leaf)[0], leaf)[0].float()
    per = cfg.policy.prompts_per_pass(cfg.data.micro_batch_size, len(completions[0]))
    made, accumulated = -(-len(idx) // per), loss_passes(cfg, len(completions[0]))
    if made != accumulated:  # DeepSpeed steps at its own boundary
        raise ValueError(f"{len(idx)} prompts make {made} passes; the engine accumulates {accumulated} "
                         "(data.micro_batch_size prompts per step)")
    values, info, chunk = [], {}, cfg.data.loss_chunk_tokens
    for s in range(0, len(idx), per):
        c = coeff[s:s + per].to(engine.device)

        def part(h, w, targets, mask, c=c):
            # one weight per row (its completion's coefficient) on each of its tokens; a zero-weight
            # row still backpropagates (zeros), so every rank's engine takes part
            total, lp = weighted_logprobs(h, w, targets, c.reshape(-1, 1).expand(targets.shape), mask, chunk)
            values.append(lp.sum(-1).view(c.shape).float().cpu())
            return total

        engine.backward(_completion_forward(engine, prompts, idx[s:s + per], completions[s:s + per], cfg, pad_id,
                                            part), part_of_sum=True)
        info = engine.step()  # DeepSpeed steps the optimizer after the last pass
    with torch.no_grad():
        loss, stats = loss_of(torch.cat(values))
    return float(loss), stats, info


@torch.no_grad()
def token_logprobs(engine: Engine, prompts: Prompts, idx: list[int], completions: list[list[list[int]]],
                   cfg: Config, pad_id: int) -> list[list[list[float]]]:
    """log pi(y_t | prompt, y_<t) of every completion token, out[prompt][sample][t], by the training
    forward (the numbers seq_logprobs sums): what the sampler's own log-probs must equal."""
    n, chunk = len(completions[0]), cfg.data.loss_chunk_tokens
    lp, mask = _completion_forward(engine, prompts, idx, completions, cfg, pad_id,
                                   lambda h, w, t, m: (sequence_logprobs(h, w, t, m, chunk), m))
    rows = [row[m].tolist() for row, m in zip(lp.float(), mask)]
    return [rows[i * n:(i + 1) * n] for i in range(len(idx))]


def _completion_forward(engine: Engine, prompts: Prompts, idx: list[int], completions: list[list[list[int]]],
                        cfg: Config, pad_id: int, fn):
    """fn(final hidden states, head weight, targets (rows, T), completion mask (rows, T)) inside the
    engine's forward, the rows being prompt idx[i]'s completions, one per row, in order."""
    n = len(completions[0])
    examples = [Example(prompts.ids[i] + c, [False] * len(prompts.ids[i]) + [True] * len(c))
                for i, row in zip(idx, completions) for c in row]
    batch = collate(examples, [[j] for j in range(len(examples))], max(len(e.ids) for e in examples),
                    pad_id).to(engine.device)
    images = {}
    if prompts.has_images:
        pixels = [prompts.pixels(i) for i in idx]
        given = [p for p in pixels if p is not None]
        if given:
            first = torch.cumsum(torch.tensor([0] + [0 if p is None else len(p) for p in pixels]), 0).tolist()
            index = [j for k, p in enumerate(pixels) if p is not None for _ in range(n)
                     for j in range(first[k], first[k + 1])]
            images = {"pixel_values": torch.cat(given).to(engine.device),
                      "image_index": torch.tensor(index, device=engine.device)}

    def head(h, w):
        return fn(h, w, batch.targets.clamp_min(0), batch.loss_mask)

    return engine.module(head, batch.ids, batch.positions, batch.segments, **images)


class Anchor:
    """An EMA of the policy, held as this rank's part of each parameter (float32), swapped into the
    engine to sample from it or score with it."""

    def __init__(self, engine: Engine, state: dict | None = None):
        self.state = state or {k: v.detach().float().clone() for k, v in engine.local_shards().items()}

    @contextlib.contextmanager
    def swapped_in(self, engine: Engine):
        """The anchor's values in the engine for the duration. A float32 policy exchanges values with
        the anchor in place (Engine.swap_local: no copy of the model); another dtype keeps a copy of
        its own values aside, so the float32 anchor never passes through the lower precision."""
        shards = engine.local_shards()
        if all(v.dtype == self.state[k].dtype for k, v in shards.items()):
            engine.swap_local(self.state)
            try:
                yield
            finally:
                engine.swap_local(self.state)
            return
        mine = {k: v.detach().clone() for k, v in shards.items()}
        engine.assign_local(self.state, refresh_master=False)
        try:
            yield
        finally:
            engine.assign_local(mine, refresh_master=False)

    def update(self, engine: Engine, rate: float) -> None:
        ema_(self.state, {k: v.detach() for k, v in engine.local_shards().items()}, rate)


# ----------------------------------------------------------------------------- evaluation

def _equal_share(n: int) -> tuple[list[int], list[int]]:
    """This rank's prompts of n (mine) and what it samples (idx): the same count on every rank, because
    ZeRO-3's gathers inside the sampler's forwards must match and a rank with no share still takes part;
    a short share is padded with a repeat of a prompt, which the caller does not count."""
    mine = list(range(n))[rank()::world_size()]
    pad = (mine or [0])[0]
    return mine, (mine or [pad]) + [pad] * (-(-n // world_size()) - len(mine or [pad]))


@torch.no_grad()
def evaluate(engine: Engine, held: Prompts | None, verifier, reward, cfg: Config, tok, *, per_problem: bool = False,
             safety: Prompts | None = None):
    """Completions of this rank's share of the held-out prompts (greedy, or policy.eval_samples at
    policy.eval_temperature, always with the same seed): the verifier's mean (accuracy; with samples, pass@1
    estimated from them) and its standard error over problems, the training reward's mean, the mean length and
    the share that stopped, over all ranks.
    safety (data.eval_safety): held-out labelled prompts, the same sampling: the refusal rate on the harmful
    ones and the over-refusal rate on the benign ones. per_problem=True returns (metrics, scores) with scores
    the verifier's mean per held-out problem in problem order, the same on every rank (stats.paired_interval
    compares two of them)."""
    if held is None:
        return ({}, []) if per_problem else {}
    p = cfg.policy
    size = min(p.eval_size, len(held.rows))
    mine, idx = _equal_share(size)
    k = p.eval_samples if p.eval_temperature > 0 else 1
    comps = rollout(engine, held, idx, k, cfg, tok, seed=0, temperature=p.eval_temperature)
    texts = decode(tok, comps)
    v, _ = score(verifier, held, idx, texts)
    r, _ = score(reward, held, idx, texts)
    v, r, real = v[:len(mine)], r[:len(mine)], comps[:len(mine)]  # the padding is not counted
    n = len(mine) * k
    scores = [0.0] * size
    for i, row in zip(mine, torch.nan_to_num(v).mean(-1).tolist()):
        scores[i] = row
    stopped = float(sum(comps.finished[:n]))  # the samples of the real prompts that ended on a stop token
    sums = all_sum([float(torch.nan_to_num(v).sum()), float(torch.nan_to_num(r).sum()), float(n),
                    float(sum(len(c) for row in real for c in row)), stopped] + scores)
    metrics = {"eval/verifier": sums[0] / sums[2], "eval/reward": sums[1] / sums[2], "eval/length": sums[3] / sums[2],
               "eval/stopped": sums[4] / sums[2],
               # the standard error of the verifier's mean over problems: the dashboards' error bars
               "eval/verifier_se": float(torch.tensor(sums[5:]).std() / size ** 0.5) if size > 1 else 0.0}
    if safety is not None:
        metrics |= safety_rates(engine, safety, cfg, tok)
    return (metrics, sums[5:]) if per_problem else metrics


def paired_summary(before: list[float], after: list[float], cfg: Config) -> dict:
    """The held-out verifier's per-problem scores before and after, and their paired difference with its
    95 % bootstrap interval over problems (stats.paired_interval); nothing without held-out problems."""
    if not before or len(before) != len(after):
        return {}
    from ..stats import paired_interval

    return {"paired": paired_interval(before, after, seed=cfg.seed), "scores": {"before": before, "after": after}}


def safety_rates(engine: Engine, safety: Prompts, cfg: Config, tok) -> dict:
    """Refusal rate on the harmful rows and over-refusal rate on the benign rows of `safety` (the safety
    reward's refusal detector, rewards.safety.is_refusal), at the held-out sampling settings, over all ranks."""
    from rewards.safety import is_refusal

    p = cfg.policy
    mine, idx = _equal_share(len(safety.rows))
    k = p.eval_samples if p.eval_temperature > 0 else 1
    comps = rollout(engine, safety, idx, k, cfg, tok, seed=0, temperature=p.eval_temperature)
    counts = [0.0] * 4  # harmful refused, harmful samples, benign refused, benign samples
    for i, row in zip(mine, decode(tok, comps)):
        at = 0 if safety.rows[i]["harmful"] else 2
        counts[at] += sum(map(is_refusal, row))
        counts[at + 1] += len(row)
    h_ref, h_n, b_ref, b_n = all_sum(counts)
    return {"eval/safety/harmful_refusal": h_ref / h_n if h_n else float("nan"),
            "eval/safety/benign_over_refusal": b_ref / b_n if b_n else float("nan")}


# ----------------------------------------------------------------------------- shared by the steps

def decode(tok, comps):
    return [[tok.decode(c, skip_special_tokens=True) for c in row] for row in comps]


def secondary(out, like: torch.Tensor) -> torch.Tensor:
    """The reward model's own scores (the tie-break), shaped like the rewards; NaN counts as lowest."""
    scores = out.per_reward.get("reward_model")
    if scores is None:
        raise UserError("policy.tie_break=reward_model needs a reward named reward_model in `rewards` (weight 0 "
                        "keeps it out of the sum); fix: add {name: reward_model, weight: 0.0} or set tie_break=half")
    return torch.tensor([-1e9 if s is None else s for s in scores], dtype=torch.float64).view_as(like)


def keep_scored(r: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """Prompts whose samples all have a score (a reward may skip a sample: on_error=skip)."""
    ok = ~torch.isnan(r).any(-1)
    for m in more:
        ok &= ~torch.isnan(m).any(-1)
    return ok


def rollout_metrics(r: torch.Tensor, comps, reward_metrics: dict) -> dict:
    lengths = [len(c) for row in comps for c in row]
    return {"reward": float(r.nanmean()), "response_length": sum(lengths) / max(len(lengths), 1),
            "entropy": comps.entropy, "stopped": comps.stopped, **reward_metrics}


# ----------------------------------------------------------------------------- one RL run

def _mean_over_ranks(metrics: dict) -> dict:
    """Each number averaged over the ranks that report it: ranks can differ in keys (a reward's
    sub-metrics, such as per-category refusal rates, exist only where the batch had such prompts)."""
    mine = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if world_size() == 1:
        return mine
    import torch.distributed as dist

    every: list = [None] * world_size()
    dist.all_gather_object(every, mine)
    keys = sorted({k for m in every for k in m})
    return {k: sum(m[k] for m in every if k in m) / sum(k in m for m in every) for k in keys}


def step_seed(cfg: Config, *key: int | str) -> int:
    """The sampler's seed for (what, run, step) on this rank: part of what makes resume=true exact."""
    return derive_seed(cfg.seed, "rl/rollout", *key, rank())


def train_loop(name: str, engine: Engine, anchor: Anchor, step_fn, prompts: Prompts, held, reward, verifier,
               cfg: Config, tok, tracker: Tracker, out_dir: Path, *, start: int, before: dict, step_offset: int = 0,
               seed_key: int = 0, log_samples: bool = True, state: dict | None = None) -> dict:
    """Steps start..policy.steps of one RL run through the step loop; checkpoints hold the engine,
    the anchor's shards, the evaluation before and `state` (more of what the run needs back on resume)."""
    p = cfg.policy
    health = RewardHealth(name, reward, cfg, cfg.data.micro_batch_size * p.samples_per_prompt)

    def one_step(step: int) -> dict:
        t0 = time.perf_counter()
        idx = prompts.batch(step, cfg.data.micro_batch_size, derive_seed(cfg.seed, "rl/run", seed_key))
        metrics = step_fn(engine, anchor, prompts, idx, reward, cfg, tok, step_seed(cfg, seed_key, step))
        metrics["step_seconds"] = time.perf_counter() - t0
        metrics = _mean_over_ranks(metrics)
        health.after_step(step, metrics, engine)
        return metrics

    loop = StepLoop(name, engine, tracker, cfg, p.steps, prefix=f"{name}/", step_offset=step_offset,
                    eval_every=p.eval_every if held is not None else 0,
                    evaluate=lambda: evaluate(engine, held, verifier, reward, cfg, tok),
                    state=lambda: {"before": before, **(state or {})}, rank_state=lambda: {"anchor": anchor.state},
                    postfix=("reward", ".3f"))
    last = loop.run(one_step, start)
    if log_samples and p.steps > start:
        log_sample_table(name, engine, prompts, reward, cfg, tok, tracker, step_offset + p.steps)
    return last


def log_sample_table(name, engine, prompts, reward, cfg, tok, tracker, step) -> None:
    idx = prompts.batch(0, min(4, len(prompts.rows)), derive_seed(cfg.seed, "rl/samples"))
    comps = rollout(engine, prompts, idx, 1, cfg, tok, seed=step_seed(cfg, "samples", step))
    texts = decode(tok, comps)
    r, _ = score(reward, prompts, idx, texts)
    rows = [[prompts.text[i], t[0], float(x)] for i, t, x in zip(idx, texts, r[:, 0])]
    tracker.table(f"{name}/samples", ["prompt", "completion", "reward"], rows, step=step)


__all__ = ["Prompts", "score", "RewardHealth", "Rollout", "stop_ids", "rollout", "seq_logprobs", "token_logprobs", "linear_loss_step", "loss_passes", "Anchor", "evaluate", "safety_rates", "paired_summary", "decode",
           "secondary", "keep_scored", "rollout_metrics", "step_seed", "train_loop", "log_sample_table"]
