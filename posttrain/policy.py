"""Stage `policy`: J-BOND, WARP, or J-BOND then WARP (README "Policy: J-BOND and WARP"; bond.py, warp.py, merge.py).

    summary = run_policy(cfg, student, tok, reward_model_path)   # writes <run_dir>/<name>/policy/

Every step, per prompt (data.prompts, `data.micro_batch_size` per rank): the policy samples with our
KV-cached sampler on its gathered weights (one gather per rollout), the rewards of the recipe score
the completions (rewards.from_config: weights, deadlines, fail-closed), and the loss is computed from
sequence log-probs (chunked: never B x T x V).
- J-BOND: `samples_per_prompt` policy samples and `anchor_samples` samples of the EMA anchor; the
  anchor is this rank's part of the weights (ZeRO-3: its shard), swapped into the engine to sample
  and score, then swapped out; anchor <- (1 - eta) anchor + eta policy after each step.
- WARP: `warp_runs` runs of `steps` steps from a shared init (each with its own engine, seed and
  prompt order, an EMA anchor with rate warp_mu), SLERP of their task vectors, LITI with liti_eta,
  `warp_iterations` times; then the final merge is evaluated at each of `eta_sweep` (policy_warp.py).
Rollouts stop at <end_of_turn>, <eos>, max_new_tokens or a token holding one of `policy.stop`.
Held-out: `policy.eval_size` prompts of data.eval, one greedy completion each (or `eval_samples` at
`eval_temperature`: pass@1 estimated from k samples), scored by the
`eval_verifier` (not part of the training reward) and the training reward, logged side by side:
reward hacking shows as the training reward rising while the verifier does not.
Checkpoints hold the engine, the anchor's shards and the prompt position: resume=true continues exactly.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch

from .bond import best_anchor, jbond_loss, quantile_reward, wins
from .config import Config
from .data import Example, to_messages
from .engine import Engine, all_sum, default_warmup, rank, world_size, write_json_atomic
from .errors import Preempted, UserError
from .loader import collate
from .losses import sequence_logprobs
from .merge import ema_
from .model import Gemma3
from .sampler import Sampler
from .tracking import Tracker, progress
from .warp import warp_loss


# ----------------------------------------------------------------------------- prompts and rewards

class Prompts:
    """Tokenized prompts with their reward columns; a seeded order, this rank's share per step."""

    def __init__(self, rows: list[dict], tok, key: str):
        if not rows:
            raise UserError(f"{key} is empty; the policy stage needs prompts")
        self.rows = rows
        try:
            self.ids = [list(tok.apply_chat_template(to_messages(r, with_reply=False), add_generation_prompt=True).ids)
                        for r in rows]
        except (KeyError, TypeError) as e:
            raise UserError(f"{key}: every row needs a `prompt` (or `messages`); {e}") from None
        self.text = [r.get("prompt") or r["messages"][-1]["content"] for r in rows]

    def batch(self, step: int, size: int, seed: int) -> list[int]:
        """This rank's `size` prompt indices for global step `step` (epochs reshuffled by seed)."""
        per_step = size * world_size()
        epoch_len = max(1, len(self.rows) // per_step)
        epoch, k = divmod(step, epoch_len)
        order = list(range(len(self.rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        first = k * per_step + rank() * size
        return [order[(first + j) % len(order)] for j in range(size)]

    def columns(self, idx: list[int], repeat: int) -> dict[str, list]:
        keys = sorted({k for i in idx for k in self.rows[i]} - {"prompt", "messages", "response", "solution", "system"})
        return {k: [self.rows[i].get(k) for i in idx for _ in range(repeat)] for k in keys}


def score(reward, prompts: Prompts, idx: list[int], completions: list[list[str]]):
    """Rewards (P, n) as a tensor (NaN where a reward skipped the sample) and the reward's metrics."""
    n = len(completions[0])
    flat = [c for row in completions for c in row]
    texts = [prompts.text[i] for i in idx for _ in range(n)]
    out = reward.score(texts, flat, **prompts.columns(idx, n))
    total = torch.tensor([float("nan") if t is None else t for t in out.total]).view(len(idx), n)
    return total, out


# ----------------------------------------------------------------------------- rollouts and log-probs

class Rollout(list):
    """Completions' token ids, out[prompt][sample], plus `entropy`: the mean over sampled tokens of
    -log pi(token) at temperature 1 (a per-token entropy estimate when sampling at temperature 1), and
    `stopped`: the share of completions that ended on a stop token rather than at max_new_tokens."""

    entropy: float = float("nan")
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
        out = Sampler(model).generate([prompts.ids[i] for i in idx], n=n, max_new_tokens=p.max_new_tokens,
                                      temperature=p.temperature if temperature is None else temperature,
                                      stop_token_ids=stop_ids(cfg, tok), seed=seed)
        model.train(was)
    result = Rollout([list(c.tokens) for c in row] for row in out)
    lps = [lp for row in out for c in row for lp in c.logprobs]
    result.entropy = -sum(lps) / len(lps) if lps else float("nan")
    finished = [c.finish_reason == "stop" for row in out for c in row]
    result.stopped = sum(finished) / len(finished)
    return result


def seq_logprobs(engine: Engine, prompts: Prompts, idx: list[int], completions: list[list[list[int]]], cfg: Config,
                 pad_id: int, post=None):
    """log pi(y) per completion, (P, n), through the engine (grad unless under no_grad). `post`, when
    given, maps that tensor to a loss inside the engine's forward (ZeRO-3 keeps the head gathered)."""
    n = len(completions[0])
    examples = [Example(prompts.ids[i] + c, [False] * len(prompts.ids[i]) + [True] * len(c))
                for i, row in zip(idx, completions) for c in row]
    batch = collate(examples, [[j] for j in range(len(examples))], max(len(e.ids) for e in examples),
                    pad_id).to(engine.device)

    def fn(h, w):
        lp = sequence_logprobs(h, w, batch.targets.clamp_min(0), batch.loss_mask, cfg.data.loss_chunk_tokens)
        lp = lp.sum(-1).view(len(idx), n)
        return lp if post is None else post(lp)

    return engine.module(fn, batch.ids, batch.positions, batch.segments)


class Anchor:
    """An EMA of the policy, held as this rank's part of each parameter (float32), swapped into the
    engine to sample from it or score with it."""

    def __init__(self, engine: Engine, state: dict | None = None):
        self.state = state or {k: v.detach().float().clone() for k, v in engine.local_shards().items()}

    @contextlib.contextmanager
    def swapped_in(self, engine: Engine):
        mine = {k: v.detach().clone() for k, v in engine.local_shards().items()}
        engine.assign_local(self.state, refresh_master=False)
        try:
            yield
        finally:
            engine.assign_local(mine, refresh_master=False)

    def update(self, engine: Engine, rate: float) -> None:
        ema_(self.state, {k: v.detach() for k, v in engine.local_shards().items()}, rate)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(engine: Engine, held: Prompts | None, verifier, reward, cfg: Config, tok) -> dict:
    """Completions of this rank's share of the held-out prompts (greedy, or policy.eval_samples at
    policy.eval_temperature, always with the same seed): the verifier's mean (accuracy; with samples, pass@1
    estimated from them), the training reward's mean, the mean length and the share that stopped, over all ranks."""
    if held is None:
        return {}
    p = cfg.policy
    size = min(p.eval_size, len(held.rows))
    mine = list(range(size))[rank()::world_size()]
    idx = mine or [0]  # a rank with no share still takes part in the collective gathers
    k = p.eval_samples if p.eval_temperature > 0 else 1
    comps = rollout(engine, held, idx, k, cfg, tok, seed=0, temperature=p.eval_temperature)
    texts = decode(tok, comps)
    v, _ = score(verifier, held, idx, texts)
    r, _ = score(reward, held, idx, texts)
    weight = 1.0 if mine else 0.0
    n = len(idx) * k
    sums = all_sum([float(torch.nan_to_num(v).sum()) * weight, float(torch.nan_to_num(r).sum()) * weight,
                    float(n) * weight, float(sum(len(c) for row in comps for c in row)) * weight,
                    comps.stopped * n * weight])
    return {"eval/verifier": sums[0] / sums[2], "eval/reward": sums[1] / sums[2], "eval/length": sums[3] / sums[2],
            "eval/stopped": sums[4] / sums[2]}


# ----------------------------------------------------------------------------- one RL step

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


def bond_step(engine: Engine, anchor: Anchor, prompts: Prompts, idx: list[int], reward, cfg: Config, tok,
              seed: int) -> dict:
    p, pad = cfg.policy, tok.pad_id
    pol = rollout(engine, prompts, idx, p.samples_per_prompt, cfg, tok, seed)
    with anchor.swapped_in(engine):
        anc = rollout(engine, prompts, idx, p.anchor_samples, cfg, tok, seed + 1)
        with torch.no_grad():
            anchor_lp = seq_logprobs(engine, prompts, idx, pol, cfg, pad)
    r_pol, out_pol = score(reward, prompts, idx, decode(tok, pol))
    r_anc, out_anc = score(reward, prompts, idx, decode(tok, anc))
    tb_pol = tb_anc = None
    if p.tie_break == "reward_model":
        tb_pol, tb_anc = secondary(out_pol, r_pol), secondary(out_anc, r_anc)
    ok = keep_scored(r_pol, r_anc)
    won = wins(r_pol.nan_to_num(), r_anc.nan_to_num(), tb_pol, tb_anc)
    q = quantile_reward(won, p.anchor_samples, p.quantile)
    best_i = best_anchor(r_anc.nan_to_num(-1e9), p.bon_n, tb_anc)
    best = [[anc[j][int(best_i[j])]] for j in range(len(idx))]
    global_prompts = all_sum([float(ok.sum())])[0]
    norm = max(global_prompts, 1.0) / world_size()  # the engine averages gradients over ranks
    stats: dict = {}

    def post(lp):  # lp (P, S + 1): the policy samples, then the best anchor sample
        keep, quant = ok.to(lp.device), q.to(lp.device)  # rewards are scored on the CPU
        loss, s = jbond_loss(lp[:, :-1][keep], anchor_lp[keep], lp[:, -1][keep], quant[keep], n=p.bon_n,
                             beta=p.beta, gamma=p.gamma, normalizer=norm)
        stats.update(s)
        return loss + 0.0 * lp.sum()  # every rank backpropagates, even with no scored prompt

    joined = [a + b for a, b in zip(pol, best)]
    loss = seq_logprobs(engine, prompts, idx, joined, cfg, pad, post=post)
    engine.backward(loss)
    info = engine.step()
    anchor.update(engine, p.eta)
    return {**info, **_rollout_metrics(r_pol, pol, out_pol.metrics), "loss": float(loss.detach()),
            "anchor_reward": float(r_anc.nanmean()), **{f"bond/{k}": v for k, v in stats.items()},
            "bond/win_rate": float((won / p.anchor_samples).mean()), "skipped_prompts": float((~ok).sum())}


def warp_step(engine: Engine, anchor: Anchor, prompts: Prompts, idx: list[int], reward, cfg: Config, tok,
              seed: int) -> dict:
    p, pad = cfg.policy, tok.pad_id
    pol = rollout(engine, prompts, idx, p.samples_per_prompt, cfg, tok, seed)
    with anchor.swapped_in(engine), torch.no_grad():
        anchor_lp = seq_logprobs(engine, prompts, idx, pol, cfg, pad)
    r_pol, out_pol = score(reward, prompts, idx, decode(tok, pol))
    ok = keep_scored(r_pol)
    norm = max(all_sum([float(ok.sum())])[0], 1.0) / world_size()
    stats: dict = {}

    def post(lp):
        keep, r = ok.to(lp.device), r_pol.to(lp.device)  # rewards are scored on the CPU
        loss, s = warp_loss(lp[keep], anchor_lp[keep], r[keep], beta=p.warp_beta, normalizer=norm)
        stats.update(s)
        return loss + 0.0 * lp.sum()

    loss = seq_logprobs(engine, prompts, idx, pol, cfg, pad, post=post)
    engine.backward(loss)
    info = engine.step()
    anchor.update(engine, p.warp_mu)
    return {**info, **_rollout_metrics(r_pol, pol, out_pol.metrics), "loss": float(loss.detach()),
            **{f"warp/{k}": v for k, v in stats.items()}, "skipped_prompts": float((~ok).sum())}


def _rollout_metrics(r: torch.Tensor, comps, reward_metrics: dict) -> dict:
    lengths = [len(c) for row in comps for c in row]
    return {"reward": float(r.nanmean()), "response_length": sum(lengths) / max(len(lengths), 1),
            "entropy": comps.entropy, "stopped": comps.stopped, **reward_metrics}


# ----------------------------------------------------------------------------- the stage

def build_reward(cfg: Config, reward_model_path: Path | None):
    """The recipe's rewards; a `reward_model` entry without a path gets the warm stage's model."""
    import rewards

    specs = []
    for spec in cfg.rewards:
        d = spec.model_dump()
        if d["name"] == "reward_model" and "path" not in d["options"]:
            if reward_model_path is None or not Path(reward_model_path).exists():
                raise UserError("rewards: reward_model has no options.path and no warm stage produced one; fix: run "
                                "the warm stage first (stages=[...,warm,policy]) or give options: {path: DIR}")
            d["options"] = {**d["options"], "path": str(reward_model_path)}
        specs.append(d)
    return rewards.from_config(specs)


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


def _seed(cfg: Config, *key: int) -> int:
    return hash((cfg.seed, *key, rank())) & 0xFFFFFFF


def train_loop(name: str, engine: Engine, anchor: Anchor, step_fn, prompts: Prompts, held, reward, verifier,
               cfg: Config, tok, tracker: Tracker, out_dir: Path, *, start: int, before: dict, step_offset: int = 0,
               seed_key: int = 0, log_samples: bool = True) -> dict:
    """Steps start..policy.steps of one RL run; checkpoints (engine + anchor + eval before) as it goes."""
    p = cfg.policy
    bar = progress(total=p.steps, initial=start, desc=name)
    last: dict = {}
    for step in range(start, p.steps):
        t0 = time.perf_counter()
        idx = prompts.batch(step + 1000 * seed_key, cfg.data.micro_batch_size, cfg.seed + seed_key)
        metrics = step_fn(engine, anchor, prompts, idx, reward, cfg, tok, _seed(cfg, seed_key, step))
        metrics["step_seconds"] = time.perf_counter() - t0
        metrics = _mean_over_ranks(metrics)
        done = step + 1
        if held is not None and p.eval_every and done % p.eval_every == 0 and done < p.steps:
            metrics |= evaluate(engine, held, verifier, reward, cfg, tok)
        if done % cfg.tracking.log_every == 0 or done == p.steps:
            tracker.log({f"{name}/{k}": v for k, v in metrics.items()}, step=step_offset + done)
        last = metrics
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        stop = engine.stop_requested()
        if (engine.should_save(done) and done < p.steps) or stop:
            engine.save(done, extra={"before": before}, rank_state={"anchor": anchor.state})
        if stop:
            bar.close()
            tracker.finish()
            engine.close()
            raise Preempted(f"{name}: SIGTERM: saved step {done} in {engine.ckpt_dir}; resume with resume=true")
    bar.close()
    if log_samples and p.steps > start:
        _log_samples(name, engine, prompts, reward, cfg, tok, tracker, step_offset + p.steps)
    return last


def _log_samples(name, engine, prompts, reward, cfg, tok, tracker, step) -> None:
    idx = prompts.batch(0, min(4, len(prompts.rows)), cfg.seed)
    comps = rollout(engine, prompts, idx, 1, cfg, tok, seed=_seed(cfg, 7, step))
    texts = decode(tok, comps)
    r, _ = score(reward, prompts, idx, texts)
    rows = [[prompts.text[i], t[0], float(x)] for i, t, x in zip(idx, texts, r[:, 0])]
    tracker.table(f"{name}/samples", ["prompt", "completion", "reward"], rows, step=step)


def run_bond(cfg: Config, student: Gemma3, tok, prompts, held, reward, verifier, tracker, out_dir: Path) -> dict:
    p = cfg.policy
    engine = Engine(student, cfg, lr=p.lr, steps=p.steps, warmup_steps=default_warmup(p.steps, p.warmup_steps), out_dir=out_dir,
                    grad_accum=1)  # one rollout batch per optimizer step: the anchor follows every step
    start, extra = engine.resume() if cfg.resume else (0, None)
    state = (engine.resumed_rank_state or {}).get("anchor")
    anchor = Anchor(engine, state)
    before = (extra or {}).get("before") or {}
    if start >= p.steps and extra is not None and "summary" in extra:
        if rank() == 0:
            print(f"J-BOND already finished: its checkpoint is at step {start} of {p.steps}; nothing to do")
        engine.close()
        return extra["summary"]
    if not before:
        before = evaluate(engine, held, verifier, reward, cfg, tok)
        tracker.log({f"bond/{k}": v for k, v in before.items()}, step=0)
    last = train_loop("bond", engine, anchor, bond_step, prompts, held, reward, verifier, cfg, tok, tracker, out_dir,
                      start=start, before=before)
    after = evaluate(engine, held, verifier, reward, cfg, tok)
    tracker.log({f"bond/{k}": v for k, v in after.items()}, step=p.steps)
    summary = {"steps": p.steps, "before": before, "after": after, "last": last}
    engine.export_final(tok, out_dir / "final", summary)
    engine.save(p.steps, extra={"before": before, "summary": summary}, rank_state={"anchor": anchor.state})
    engine.close()
    return summary


def run_policy(cfg: Config, student: Gemma3, tok, reward_model_path: Path | None = None,
               out_dir: Path | None = None) -> tuple[Path, dict]:
    """The policy stage; returns (the final policy's HF directory, the summary)."""
    from .distill import load_split

    p, out_dir = cfg.policy, Path(out_dir or cfg.out_dir / "policy")
    prompts = Prompts(load_split(cfg.data.prompts, "data.prompts"), tok, "data.prompts")
    held = Prompts(load_split(cfg.data.eval, "data.eval"), tok, "data.eval") if cfg.data.eval else None
    reward = build_reward(cfg, reward_model_path)
    import rewards

    verifier = rewards.from_config([{"name": p.eval_verifier}])
    tracker = Tracker(cfg.tracking, out_dir, config=cfg.model_dump(), name=f"{cfg.name}-policy", group=cfg.name)
    summary: dict = {"algorithm": p.algorithm}
    final = None
    if p.algorithm in ("bond", "bond_then_warp"):
        summary["bond"] = run_bond(cfg, student, tok, prompts, held, reward, verifier, tracker, out_dir / "bond")
        final = out_dir / "bond" / "final"
    if p.algorithm in ("warp", "bond_then_warp"):
        if final is not None:
            from .checkpoint import load_model

            student = load_model(final, dtype=student.embed_tokens.weight.dtype)
        from .policy_warp import run_warp

        summary["warp"] = run_warp(cfg, student, tok, prompts, held, reward, verifier, tracker, out_dir / "warp",
                                   first_step=p.steps if "bond" in summary else 0)
        final = out_dir / "warp" / "final"
    tracker.finish()
    if rank() == 0:
        write_json_atomic(out_dir / "summary.json", summary)
        for part in ("bond", "warp"):
            if part in summary and summary[part].get("after"):
                b, a = summary[part]["before"], summary[part]["after"]
                print(f"policy/{part}: held-out {p.eval_verifier} {b.get('eval/verifier', float('nan')):.3f} -> "
                      f"{a.get('eval/verifier', float('nan')):.3f}, training reward "
                      f"{b.get('eval/reward', float('nan')):.3f} -> {a.get('eval/reward', float('nan')):.3f}")
    return final, summary


__all__ = ["run_policy", "Anchor", "Prompts", "bond_step", "warp_step", "evaluate"]
