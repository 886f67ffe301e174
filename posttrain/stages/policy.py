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

from pathlib import Path

import torch

from ..bond import best_anchor, jbond_loss, quantile_reward, wins
from ..config import Config
from ..engine import Engine, all_sum, default_warmup, rank, world_size, write_json_atomic
from ..errors import UserError
from ..images import image_config
from ..model import Gemma3
from ..seeds import derive_seed
from ..stats import format_interval
from .policy_warp import run_warp
from .rl import (Anchor, Prompts, decode, evaluate, keep_scored, linear_loss_step, loss_passes, paired_summary,
                 rollout, rollout_metrics, score, secondary, seq_logprobs, train_loop)
from ..tracking import Tracker
from .loop import StageResult, finish, finished

# ----------------------------------------------------------------------------- J-BOND

def bond_step(engine: Engine, anchor: Anchor, prompts: Prompts, idx: list[int], reward, cfg: Config, tok,
              seed: int) -> dict:
    p, pad = cfg.policy, tok.pad_id
    pol = rollout(engine, prompts, idx, p.samples_per_prompt, cfg, tok, seed)
    with anchor.swapped_in(engine):
        anc = rollout(engine, prompts, idx, p.anchor_samples, cfg, tok, derive_seed(seed, "anchor"))
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
    def loss_of(lp):  # lp (P, S + 1): the policy samples, then the best anchor sample
        keep, quant, a = ok.to(lp.device), q.to(lp.device), anchor_lp.to(lp.device)  # rewards: scored on the CPU
        return jbond_loss(lp[:, :-1][keep], a[keep], lp[:, -1][keep], quant[keep], n=p.bon_n,
                          beta=p.beta, gamma=p.gamma, normalizer=norm)

    joined = [a + b for a, b in zip(pol, best)]
    # the best anchor sample's coefficient does not depend on its log-prob: the anchor's own stands in
    sampled = torch.cat([pol.sequence_logprobs(), anc.sequence_logprobs().gather(1, best_i.view(-1, 1).long())], 1)
    loss, stats, info = linear_loss_step(engine, prompts, idx, joined, cfg, pad, loss_of, sampled)
    anchor.update(engine, p.eta)
    return {**info, **rollout_metrics(r_pol, pol, out_pol.metrics), "loss": loss,
            "anchor_reward": float(r_anc.nanmean()), **{f"bond/{k}": v for k, v in stats.items()},
            "bond/win_rate": float((won / p.anchor_samples).mean()), "skipped_prompts": float((~ok).sum())}


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


def run_bond(cfg: Config, student: Gemma3, tok, prompts, held, reward, verifier, tracker, out_dir: Path,
             safety=None) -> dict:
    p = cfg.policy
    if (summary := finished(cfg, out_dir, p.steps, "J-BOND")) is not None:
        return summary
    engine = Engine(student, cfg, lr=p.lr, steps=p.steps, warmup_steps=default_warmup(p.steps, p.warmup_steps),
                    out_dir=out_dir, grad_accum=loss_passes(cfg, p.samples_per_prompt + 1))  # one optimizer step per
    # rollout batch (the anchor follows every step), in passes of policy.rows_per_pass rows
    start, extra = engine.resume() if cfg.resume else (0, None)
    state = (engine.resumed_rank_state or {}).get("anchor")
    anchor = Anchor(engine, state)
    before = (extra or {}).get("before") or {}
    before_scores = (extra or {}).get("before_scores") or []
    if not before:
        before, before_scores = evaluate(engine, held, verifier, reward, cfg, tok, per_problem=True, safety=safety)
        tracker.log({f"bond/{k}": v for k, v in before.items()}, step=0)
    last = train_loop("bond", engine, anchor, bond_step, prompts, held, reward, verifier, cfg, tok, tracker, out_dir,
                      start=start, before=before, state={"before_scores": before_scores})
    after, after_scores = evaluate(engine, held, verifier, reward, cfg, tok, per_problem=True, safety=safety)
    tracker.log({f"bond/{k}": v for k, v in after.items()}, step=p.steps)
    summary = {"steps": p.steps, "before": before, "after": after, "last": last,
               **paired_summary(before_scores, after_scores, cfg)}
    engine.export_final(tok, out_dir / "final", summary)
    finish(engine, out_dir, p.steps, summary, state={"before": before, "before_scores": before_scores},
           rank_state={"anchor": anchor.state})
    engine.close()
    return summary


def safety_prompts(cfg: Config, tok, images) -> Prompts | None:
    """data.eval_safety as prompts; every row needs a boolean `harmful` (what the rates are counted by)."""
    if not cfg.data.eval_safety:
        return None
    from .distill import load_split

    rows = load_split(cfg.data.eval_safety, "data.eval_safety")
    for i, row in enumerate(rows):
        if not isinstance(row.get("harmful"), bool):
            raise UserError(f"data.eval_safety ({cfg.data.eval_safety}), row {i}: needs a boolean 'harmful' (true for "
                            f"a prompt to refuse, false for one to answer), got {row.get('harmful')!r}; fix: label "
                            "the row, or use the bundled safety_prompts_eval")
    return Prompts(rows, tok, "data.eval_safety", images)


def run_policy(cfg: Config, student: Gemma3, tok, reward_model_path: Path | None = None,
               out_dir: Path | None = None) -> StageResult:
    """The policy stage; returns the final policy's HF directory and the summary."""
    from .distill import load_split

    p, out_dir = cfg.policy, Path(out_dir or cfg.out_dir / "policy")
    images = image_config(student.config, cfg.data.pan_and_scan)
    prompts = Prompts(load_split(cfg.data.prompts, "data.prompts"), tok, "data.prompts", images)
    held = Prompts(load_split(cfg.data.eval, "data.eval"), tok, "data.eval", images) if cfg.data.eval else None
    safety = safety_prompts(cfg, tok, images)
    reward = build_reward(cfg, reward_model_path)
    import rewards

    verifier = rewards.from_config([{"name": p.eval_verifier}])
    tracker = Tracker(cfg.tracking, out_dir, config=cfg.model_dump(), name=f"{cfg.name}-policy", group=cfg.name)
    summary: dict = {"algorithm": p.algorithm}
    final = None
    if p.algorithm in ("bond", "bond_then_warp"):
        summary["bond"] = run_bond(cfg, student, tok, prompts, held, reward, verifier, tracker, out_dir / "bond",
                                   safety)
        final = out_dir / "bond" / "final"
    if p.algorithm in ("warp", "bond_then_warp"):
        if final is not None:
            from ..checkpoint import load_model

            student = load_model(final, dtype=student.embed_tokens.weight.dtype)
        summary["warp"] = run_warp(cfg, student, tok, prompts, held, reward, verifier, tracker, out_dir / "warp",
                                   first_step=p.steps if "bond" in summary else 0, safety=safety)
        final = out_dir / "warp" / "final"
    tracker.finish()
    if rank() == 0:
        write_json_atomic(out_dir / "summary.json", summary)
        for part in ("bond", "warp"):
            if part in summary and summary[part].get("after"):
                b, a = summary[part]["before"], summary[part]["after"]
                print(f"policy/{part}: held-out {p.eval_verifier} {b.get('eval/verifier', float('nan')):.3f} -> "
                      f"{a.get('eval/verifier', float('nan')):.3f}" + (
                          f" (paired difference {format_interval(summary[part]['paired'])}, 95 % bootstrap over "
                          f"{summary[part]['paired']['n']} problems)" if "paired" in summary[part] else "") +
                      f", training reward {b.get('eval/reward', float('nan')):.3f} -> "
                      f"{a.get('eval/reward', float('nan')):.3f}")
    return StageResult(final, summary)


__all__ = ["run_policy", "run_bond", "bond_step", "build_reward"]
