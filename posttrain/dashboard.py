"""One dashboard per stage and one summary figure per run (`python -m posttrain.plot RUN_DIR`).

- `dashboard_<stage>.png`: a grid of the stage's curves, one panel per question a user asks of it:
  - distill: held-out KL(teacher || student) and top-1 agreement, the loss, the pre-clip gradient norm;
  - warm: each member's loss and training accuracy, gradient norms, and the held-out accuracy of the
    probe, the members, their mean, ENS (the members' averaged scores) and WARM (their averaged weights);
  - policy (bond, and warp: one dashboard each): the training reward beside the held-out verifier (error
    bars: 95 % over problems, 1.96 standard errors), KL to the anchor, the loss, response lengths, the
    gradient norm, the held-out safety rates.
- `summary.png`: the run's summary table (summary.py) as bars, before and after, each value written on
  its bar, the policy's paired difference and 95 % interval in its panel's title.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from pathlib import Path

from .summary import Row

# stage -> panels (title, key patterns); a panel with no matching key is left out
PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "distill": [("held-out KL(teacher || student)", ["eval/kl"]),
                ("held-out top-1 agreement with the teacher", ["eval/top1", "eval/label_top1"]),
                ("loss", ["loss"]), ("gradient norm (before clipping)", ["grad_norm"]),
                ("tokens / s", ["tokens_per_s"])],
    "warm": [("members: loss", ["member_*/loss", "probe/loss"]),
             ("members: training accuracy", ["member_*/train_accuracy", "probe/train_accuracy"]),
             ("gradient norm (before clipping)", ["member_*/grad_norm"])],
    "bond": [("reward: training rollouts and held-out verifier", ["bond/reward", "bond/eval/verifier"]),
             ("KL to the anchor", ["bond/bond/kl"]), ("loss", ["bond/loss"]),
             ("response length (tokens)", ["bond/response_length", "bond/eval/length"]),
             ("gradient norm (before clipping)", ["bond/grad_norm"]),
             ("held-out safety", ["bond/eval/safety/*"])],
    "warp": [("reward: training rollouts and held-out verifier", ["warp_i*_r*/reward", "warp/iter*/*/eval/verifier"]),
             ("KL to the anchor", ["warp_i*_r*/warp/kl_to_anchor"]), ("loss", ["warp_i*_r*/loss"]),
             ("response length (tokens)", ["warp_i*_r*/response_length"]),
             ("gradient norm (before clipping)", ["warp_i*_r*/grad_norm"]),
             ("held-out safety", ["warp/iter*/*/eval/safety/*"])],
    "qat": [("loss", ["loss"]), ("gradient norm (before clipping)", ["grad_norm"]), ("held-out", ["eval/*"])],
}
# a metrics file's stage: its directory's name; the policy file holds both of its parts
PARTS = {"policy": ("bond", "warp")}


def series_of(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] of one metrics file's numeric records."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        for key, value in rec.items():
            if key not in ("file", "step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key].append((rec["step"], float(value)))
    return out


def dashboards(by_file: dict[str, list[dict]], summaries: dict, out: Path) -> list[Path]:
    """dashboard_<stage>.png for every stage with curves; returns the files written."""
    written = []
    for file, records in sorted(by_file.items()):
        stage = Path(file).parent.name
        series = series_of(records)
        for part in PARTS.get(stage, (stage,)):
            panels = dashboard_panels(part, series)
            bars = _warm_bars(summaries.get("warm", {})) if part == "warm" else []
            if not panels and not bars:
                continue
            path = out / f"dashboard_{part}.png"
            _draw_dashboard(part, panels, series, bars, path)
            written.append(path)
    return written


def dashboard_panels(part: str, series: dict) -> list[tuple[str, list[str]]]:
    """The panels (title, keys drawn) of one stage's dashboard: PANELS' patterns matched to its keys."""
    panels = [(title, _matching(series, patterns)) for title, patterns in PANELS.get(part, [])]
    return [(title, keys) for title, keys in panels if keys]


def summary_figure(rows: list[Row], path: Path) -> dict[tuple[str, str], tuple[float | None, float]]:
    """summary.png from the summary rows; returns what it drew, (stage, metric) -> (before, after)."""
    import matplotlib.pyplot as plt

    by_stage: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_stage[r.stage].append(r)
    drawn: dict[tuple[str, str], tuple[float | None, float]] = {}
    if not by_stage:
        return drawn
    fig, axes = plt.subplots(1, len(by_stage), figsize=(4.2 * len(by_stage), 4.2), squeeze=False)
    for ax, (stage, stage_rows) in zip(axes[0], by_stage.items()):
        names = [r.metric.removeprefix("eval/") for r in stage_rows]
        y = range(len(stage_rows))
        # each metric's pair of bars is scaled to the larger of its two values (metrics differ in scale:
        # a length of 20 tokens beside an accuracy of 0.2); the numbers written beside them are the values
        # a value without a before (WARM's accuracies) is scaled with the others of its kind, so they compare
        alone = max((abs(r.after) for r in stage_rows if r.before is None), default=1.0) or 1.0
        scale = [(max(abs(r.after), abs(r.before)) or 1.0) if r.before is not None else alone for r in stage_rows]
        befores = [math.nan if r.before is None else r.before / k for r, k in zip(stage_rows, scale)]
        afters = [r.after / k for r, k in zip(stage_rows, scale)]
        ax.barh([i + 0.2 for i in y], befores, height=0.4, color="#bbbbbb", label="before")
        ax.barh([i - 0.2 for i in y], afters, height=0.4, color="#3b75af", label="after")
        for i, r in enumerate(stage_rows):
            if r.before is not None:
                ax.text(max(befores[i], 0.0), i + 0.2, f" {r.before:.4f}", va="center", fontsize=7)
            ax.text(max(afters[i], 0.0), i - 0.2, f" {r.after:.4f}", va="center", fontsize=7)
            drawn[(stage, r.metric)] = (r.before, r.after)
        ax.set_yticks(list(y), names, fontsize=7)
        ax.set_xticks([])
        ax.set_xlim(min(0.0, *afters, *[b for b in befores if b == b]) * 1.1, 1.45)
        ax.invert_yaxis()
        title = stage
        if paired := next((r.paired for r in stage_rows if r.paired), None):
            title += (f"\nverifier {paired['diff']:+.3f} [{paired['lo']:+.3f}, {paired['hi']:+.3f}]"
                      f"\n(paired, 95 %, {paired['n']} problems)")
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("held-out, before (grey) and after (blue) each stage: the run's summary table "
                 "(bars scaled per metric)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _matching(series: dict, patterns: list[str]) -> list[str]:
    return [k for k in sorted(series) if any(fnmatch.fnmatchcase(k, p) for p in patterns)]


def _warm_bars(warm: dict) -> list[tuple[str, float]]:
    bars = [("probe", warm.get("probe_accuracy"))]
    bars += [(f"member {i}", a) for i, a in enumerate(warm.get("member_accuracy") or [])]
    bars += [("mean member", warm.get("mean_member_accuracy")), ("ENS", warm.get("ens_accuracy")),
             ("WARM", warm.get("warm_accuracy"))]
    return [(name, float(v)) for name, v in bars if isinstance(v, (int, float))]


def _draw_dashboard(part: str, panels, series, bars, path: Path) -> None:
    import matplotlib.pyplot as plt

    n = len(panels) + bool(bars)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, keys) in zip(flat, panels):
        for key in keys:
            steps, values = zip(*series[key])
            se = dict(series.get(key + "_se", []))
            if se:  # a held-out mean with its standard error: 95 % error bars
                ax.errorbar(steps, values, yerr=[1.96 * se.get(s, 0.0) for s in steps], marker="o", capsize=3,
                            label=key)
            else:
                ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=6)
    if bars:
        ax = flat[len(panels)]
        names, values = zip(*bars)
        ax.bar(names, values, color=["#999999"] + ["#bbbbbb"] * (len(names) - 4) + ["#777777", "#d08c2f", "#3b75af"])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.08)
        ax.set_title("held-out preference accuracy", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"{part}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["PANELS", "dashboards", "dashboard_panels", "summary_figure", "series_of"]
