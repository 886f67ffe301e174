"""Stage `warm`: weight-averaged reward models (WARM, Ramé et al. 2024).

    summary = run_warm(cfg, backbone, tok)          # writes <run_dir>/<name>/warm/

1. Linear probe: the scalar head is trained on frozen features (the backbone's last-token hidden
   states, computed once) with the Bradley-Terry loss; this backbone + head is the shared init.
2. M members fine-tune from that same init, differing by seed, data order, learning rate and
   dropout (`warm.lrs`, `warm.dropouts`, taken in turn). Each runs under the engine (ZeRO 0-3, step
   checkpoints); when it finishes, every rank writes the part of each tensor it holds
   (`member_<m>/shard_rank<r>.pt`, with a fingerprint of the init) and its held-out scores.
3. WARM: the members' shards are averaged uniformly, tensor by tensor, on each rank: a ZeRO-3 run
   never gathers a whole model to average. Members of different shapes or from different inits
   are refused. The average is evaluated and saved as `reward_model/` (RewardModel.load, or
   `rewards.get("reward_model", path=...)`).
Evaluation on held-out pairs (`data.eval_preferences`, else a seeded `warm.eval_share` of the pairs):
accuracy of each member, of ENS (the mean of the members' scores) and of WARM, and along the linear
path between members 0 and 1 (lambda 0, 0.25, 0.5, 0.75, 1). `warm.label_noise` flips that share of
the training labels (the paper's robustness experiment).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import resource
from pathlib import Path

import torch

from ..config import Config
from ..engine import Engine, Frozen, all_sum, barrier, dedupe_root, default_warmup, rank, world_size, write_json_atomic
from ..errors import UserError
from ..merge import lerp, uniform_average
from ..model import Gemma3
from ..reward_model import Pair, RewardModel, bradley_terry_loss, collate_pairs, pair_examples
from ..seeds import derive_seed
from ..tracking import Tracker
from .loop import DONE, StageResult, StepLoop, drop_checkpoints, finished

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------- data

def split_pairs(pairs: list[Pair], share: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    order = list(range(len(pairs)))
    random.Random(derive_seed(seed, "warm/held_out")).shuffle(order)
    n_eval = max(1, int(round(share * len(pairs))))
    held = sorted(order[:n_eval])
    held_set = set(held)
    return [pairs[i] for i in range(len(pairs)) if i not in held_set], [pairs[i] for i in held]


def flip_labels(pairs: list[Pair], share: float, seed: int) -> list[Pair]:
    """A copy with `share` of the pairs (seeded choice) swapped: rejected presented as chosen."""
    r = random.Random(derive_seed(seed, "warm/label_noise"))
    flip = set(r.sample(range(len(pairs)), int(round(share * len(pairs)))))
    return [Pair(p.rejected, p.chosen) if i in flip else p for i, p in enumerate(pairs)]


# ----------------------------------------------------------------------------- probing

@torch.no_grad()
def pair_features(rm: RewardModel, pairs: list[Pair], pad_id: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    rm.eval()
    chosen, rejected = [], []
    for s in range(0, len(pairs), batch):
        ids, lengths = collate_pairs(pairs[s:s + batch], pad_id, _device(rm))
        f = rm.features(ids, lengths)
        n = ids.shape[0] // 2
        chosen.append(f[:n])
        rejected.append(f[n:])
    return torch.cat(chosen), torch.cat(rejected)


def probe_head(rm: RewardModel, pairs: list[Pair], cfg: Config, pad_id: int) -> dict:
    """Train the head alone on frozen features (full batch, Adam); the same result on every rank."""
    fc, fr = pair_features(rm, pairs, pad_id, cfg.data.micro_batch_size)
    head = rm.head
    opt = torch.optim.Adam(head.parameters(), lr=cfg.warm.probe_lr)
    loss = torch.zeros(())
    for _ in range(cfg.warm.probe_steps):
        loss = bradley_terry_loss(head(fc).squeeze(-1), head(fr).squeeze(-1), cfg.warm.margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (head(fc) > head(fr)).float().mean().item()
    return {"probe/loss": float(loss.detach()), "probe/train_accuracy": acc}


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def margins(module, pairs: list[Pair], pad_id: int, batch: int) -> list[float]:
    """r(chosen) - r(rejected) for each pair, through `module` (an engine or a RewardModel).
    Every rank runs every pair (ZeRO-3 forwards are collective)."""
    out = []
    for s in range(0, len(pairs), batch):
        ids, lengths = collate_pairs(pairs[s:s + batch], pad_id, _device(module))
        r = module(ids, lengths)
        n = ids.shape[0] // 2
        out += (r[:n] - r[n:]).tolist()
    return out


def accuracy(m: list[float]) -> float:
    return sum(x > 0 for x in m) / max(len(m), 1)


# ----------------------------------------------------------------------------- shards

def fingerprint(shards: dict[str, torch.Tensor]) -> str:
    """A short id of weights (per rank: of the part it holds): sums and sums of squares per tensor."""
    h = hashlib.sha256()
    for name in sorted(shards):
        t = shards[name].detach().double()
        h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.10e}:{t.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def average_shards(members: list[dict]) -> dict[str, torch.Tensor]:
    """Uniform average of members {"init": id, "shards": {name: tensor}}, tensor by tensor.
    Refuses members with other tensors, other shapes, or another init: WARM averages fine-tunings of
    one shared init (weights of unrelated models do not interpolate)."""
    if not members:
        raise UserError("WARM needs at least one member to average")
    ref = members[0]
    for m, member in enumerate(members[1:], 1):
        if member["init"] != ref["init"]:
            raise UserError(f"WARM member {m} was fine-tuned from another init ({member['init']} vs "
                            f"{ref['init']}): members must all start from the same linear-probed model; fix: "
                            "train them in one warm stage (delete stale member_* directories)")
        if set(member["shards"]) != set(ref["shards"]):
            extra = sorted(set(member["shards"]) ^ set(ref["shards"]))[:4]
            raise UserError(f"WARM member {m} has other tensors than member 0 (e.g. {extra}): not the same architecture")
        for name, t in member["shards"].items():
            if t.shape != ref["shards"][name].shape:
                raise UserError(f"WARM member {m}'s tensor {name} has shape {tuple(t.shape)}, member 0's "
                                f"{tuple(ref['shards'][name].shape)}: members must share one architecture")
    return uniform_average([member["shards"] for member in members])


def _device(module) -> torch.device:
    """Where a module (a reward model, or the engine holding one) computes: pairs are collated on the CPU."""
    return next(module.parameters()).device


def _load_member(path: Path) -> dict:
    return torch.load(path / f"shard_rank{rank()}.pt", weights_only=True)


# ----------------------------------------------------------------------------- the stage

def _member_settings(cfg: Config, m: int) -> dict:
    w = cfg.warm
    return {"seed": derive_seed(cfg.seed, "warm/member", m), "lr": w.lrs[m % len(w.lrs)], "dropout": w.dropouts[m % len(w.dropouts)]}


def train_member(m: int, init: RewardModel, train: list[Pair], held: list[Pair], cfg: Config, pad_id: int,
                 out_dir: Path, tracker: Tracker, init_id: str, device: torch.device) -> dict:
    """Fine-tune member m from the init; returns its result (also member_<m>/result.json)."""
    w, B = cfg.warm, cfg.data.micro_batch_size
    mdir = out_dir / f"member_{m}"
    result_path = mdir / "result.json"
    if cfg.resume and result_path.exists() and (mdir / f"shard_rank{rank()}.pt").exists():
        return json.loads(result_path.read_text())
    settings = _member_settings(cfg, m)
    torch.manual_seed(settings["seed"])
    member = copy.deepcopy(init).to(device)
    member.set_dropout(settings["dropout"])
    engine = Engine(member, cfg, lr=settings["lr"], steps=w.steps, warmup_steps=default_warmup(w.steps, w.warmup_steps), out_dir=mdir)
    start, extra = engine.resume() if cfg.resume else (0, None)
    per_step = B * world_size()
    epoch_len = max(1, len(train) // per_step)

    def batch_at(step: int) -> list[Pair]:
        epoch, k = divmod(step, epoch_len)
        order = list(range(len(train)))
        random.Random(derive_seed(settings["seed"], "warm/pair_order", epoch)).shuffle(order)
        first = k * per_step + rank() * B
        return [train[i] for i in order[first:first + B]]

    def step_fn(step: int) -> dict:
        pairs = batch_at(step)
        ids, lengths = collate_pairs(pairs, pad_id, engine.device)
        r = engine.module(ids, lengths)
        n = len(pairs)
        loss = bradley_terry_loss(r[:n], r[n:], w.margin)
        engine.backward(loss)
        info = engine.step()
        loss_sum, correct, count = all_sum([float(loss.detach()) * n, float((r[:n] > r[n:]).sum()), float(n)])
        return {"loss": loss_sum / count, "train_accuracy": correct / count, "lr": info["lr"],
                "grad_norm": info["grad_norm"]}

    StepLoop(f"warm member {m}", engine, tracker, cfg, w.steps, prefix=f"member_{m}/",
             step_offset=m * w.steps).run(step_fn, start)
    engine.model.eval()
    held_margins = margins(engine.module, held, pad_id, B)
    mdir.mkdir(parents=True, exist_ok=True)
    torch.save({"init": init_id, "shards": {k: v.detach().clone() for k, v in engine.local_shards().items()}},
               mdir / f"shard_rank{rank()}.pt")
    result = {"member": m, **settings, "accuracy": accuracy(held_margins), "margins": held_margins,
              "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if cfg.warm.save_members:
        with engine.full_weights():
            if rank() == 0:
                engine.model.save(mdir / "reward_model")
    barrier()
    if rank() == 0:
        write_json_atomic(result_path, result)
    drop_checkpoints(cfg, mdir)  # the member's result is its shards now
    engine.close()
    return result


def run_warm(cfg: Config, backbone: Gemma3, tok, out_dir: Path | None = None) -> StageResult:
    """The WARM reward model (<stage dir>/reward_model) and the accuracy table."""
    w, data_cfg = cfg.warm, cfg.data
    out_dir = Path(out_dir or cfg.out_dir / "warm")
    if (table := finished(cfg, out_dir, w.steps, "stage warm")) is not None:
        return StageResult(out_dir / "reward_model", table)
    from .distill import load_split

    rows = load_split(data_cfg.preferences, "data.preferences")
    if w.max_pairs is not None and len(rows) > w.max_pairs:
        rows = random.Random(derive_seed(cfg.seed, "warm/subset")).sample(rows, w.max_pairs)  # a seeded subset, before the held-out split
    pairs = pair_examples(rows, tok, data_cfg.max_seq_len)
    if data_cfg.eval_preferences:
        train, held = pairs, pair_examples(load_split(data_cfg.eval_preferences, "data.eval_preferences"), tok,
                                           data_cfg.max_seq_len)
    else:
        train, held = split_pairs(pairs, w.eval_share, cfg.seed)
    if w.label_noise:
        train = flip_labels(train, w.label_noise, cfg.seed)
    tracker = Tracker(cfg.tracking, out_dir, config=cfg.model_dump(), name=f"{cfg.name}-warm", group=cfg.name)
    pad, B = tok.pad_id, data_cfg.micro_batch_size

    # 1. the shared init: backbone + linear-probed head
    init = RewardModel(backbone)
    probe = probe_head(init, train, cfg, pad) if w.probe_steps else {}
    init_id = fingerprint(dict(init.state_dict()))  # of the whole init: the same id on every rank
    if held:
        probe["probe/accuracy"] = accuracy(margins(init.eval(), held, pad, B))  # the shared init, held out
    tracker.log(probe, step=0)

    # 2. members. The shared init waits in host memory meanwhile: on a GPU, a whole copy of it beside each
    # member's (sharded) engine would not fit a large model. On the CPU this moves nothing.
    device = _device(init)
    init.to("cpu")
    results = [train_member(m, init, train, held, cfg, pad, out_dir, tracker, init_id, device)
               for m in range(w.members)]

    # 3. WARM = uniform average of the members' shards; evaluated through an engine holding them
    final = RewardModel(copy.deepcopy(backbone)).to(device)
    final.head.load_state_dict(init.head.state_dict())
    engine = Frozen(final, cfg, like_trained=True)  # evaluates and saves the averages: no optimizer state
    members = [_load_member(out_dir / f"member_{m}") for m in range(w.members)]  # this rank's parts
    engine.assign_local(average_shards(members))
    engine.model.eval()
    warm_margins = margins(engine.module, held, pad, B)
    ens = [sum(col) / len(col) for col in zip(*(r["margins"] for r in results))]
    table = {"probe_accuracy": probe.get("probe/accuracy"), "member_accuracy": [r["accuracy"] for r in results],
             "mean_member_accuracy": sum(r["accuracy"] for r in results) / len(results),
             "ens_accuracy": accuracy(ens), "warm_accuracy": accuracy(warm_margins),
             "held_out_pairs": len(held), "label_noise": w.label_noise}
    # connectivity: accuracy along the line between members 0 and 1
    if len(members) >= 2:
        known = {0.0: results[0]["accuracy"], 1.0: results[1]["accuracy"]}  # the endpoints are members 0 and 1
        if len(members) == 2:
            known[0.5] = table["warm_accuracy"]  # and with two members the midpoint is WARM itself
        path = []
        for lam in LAMBDAS:
            if lam in known:
                path.append(known[lam])
                continue
            engine.assign_local(lerp(members[0]["shards"], members[1]["shards"], lam))
            path.append(accuracy(margins(engine.module, held, pad, B)))
        table["path_lambdas"], table["path_accuracy"] = list(LAMBDAS), path
        engine.assign_local(average_shards(members))
    with engine.full_weights():
        if rank() == 0:
            engine.model.save(out_dir / "reward_model", tok,  # a frozen embedding: stored once in the run
                              dedupe_within=dedupe_root(cfg))
            write_json_atomic(out_dir / "summary.json", {**table, "probe": probe})
    barrier()
    tracker.log({f"warm/{k}": v for k, v in table.items() if isinstance(v, float)}, step=w.members * w.steps + 1)
    tracker.table("warm/accuracy", ["model", "held-out accuracy"],
                  [[f"member {r['member']} (lr {r['lr']}, dropout {r['dropout']})", r["accuracy"]] for r in results]
                  + [["ENS", table["ens_accuracy"]], ["WARM", table["warm_accuracy"]]], step=w.members * w.steps + 1)
    if rank() == 0:
        probed = table["probe_accuracy"]
        print(f"warm: held-out accuracy: linear probe (the shared init) {'-' if probed is None else f'{probed:.3f}'}; "
              "members " + ", ".join(f"{a:.3f}" for a in table["member_accuracy"])
              + f" (mean {table['mean_member_accuracy']:.3f}); ENS {table['ens_accuracy']:.3f}; "
              f"WARM {table['warm_accuracy']:.3f}")
        if "path_accuracy" in table:
            print("warm: members 0 -> 1 path: " + ", ".join(f"{lam}: {a:.3f}" for lam, a in
                                                          zip(table["path_lambdas"], table["path_accuracy"])))
    tracker.finish()
    engine.close()
    backbone.to(device)  # the caller's model, where it was
    barrier()
    if rank() == 0:
        write_json_atomic(out_dir / DONE, {"steps": w.steps, "summary": table})
        if not cfg.checkpoint.keep_optimizer:  # the members' shards: only a resume of an unfinished stage reads them
            for shard in out_dir.glob("member_*/shard_rank*.pt"):
                shard.unlink()
    barrier()
    return StageResult(out_dir / "reward_model", table)


__all__ = ["run_warm", "average_shards", "fingerprint", "split_pairs", "flip_labels", "margins", "accuracy"]
