"""The run's held-out results, one row per (stage, metric): what train.py prints at the end and what the
summary figure of `python -m posttrain.plot` draws (both read these rows, so they show the same numbers).

    rows = summary_rows(json.load(open("runs/demo/summary.json")))   # the run directory's summary.json
    print(summary_table(rows))

A row holds the value before the stage and after it (WARM's accuracies have no before). For the policy's
held-out verifier it also holds the paired comparison on the same problems and seeds (stats.py): the
difference after - before and its 95 % bootstrap interval over problems. A difference whose interval
excludes zero is a gain outside the noise of that many problems.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import format_interval

WARM_KEYS = ("probe_accuracy", "mean_member_accuracy", "ens_accuracy", "warm_accuracy")


@dataclass(frozen=True)
class Row:
    stage: str                  # distill, warm, policy/bond, policy/warp, qat/<format>
    metric: str                 # the metric's key in the stage's summary (eval/verifier, warm_accuracy, ...)
    before: float | None
    after: float
    paired: dict | None = None  # stats.paired_interval's result, for the policy's held-out verifier


def summary_rows(summaries: dict) -> list[Row]:
    """Every numeric held-out metric of every stage in `summaries` (train.py's per-stage summaries)."""
    out: list[Row] = []

    def rows(stage: str, s: dict) -> None:
        before, after = s.get("before", {}) or {}, s.get("after", {}) or {}
        for key in sorted(set(before) | set(after)):
            b, a = before.get(key), after.get(key)
            if isinstance(a, (int, float)) and not isinstance(a, bool) and key != "eval/tokens":
                paired = s.get("paired") if key == "eval/verifier" else None
                out.append(Row(stage, key, b if isinstance(b, (int, float)) else None, float(a), paired))

    if "distill" in summaries:
        rows("distill", summaries["distill"])
    if "warm" in summaries:
        w = summaries["warm"]
        for i, acc in enumerate(w.get("member_accuracy") or []):
            out.append(Row("warm", f"member_{i}_accuracy", None, float(acc)))
        out += [Row("warm", key, None, float(w[key])) for key in WARM_KEYS if isinstance(w.get(key), float)]
    for part in ("bond", "warp"):
        if s := summaries.get("policy", {}).get(part):
            rows(f"policy/{part}", s)
    if "qat" in summaries:  # before: post-training quantization of the same weights
        rows(f"qat/{summaries['qat'].get('format', '?')}", summaries["qat"])
    return out


def summary_table(rows: list[Row]) -> str:
    """The rows as the text table train.py prints; empty without rows."""
    if not rows:
        return ""
    lines = ["summary (held-out)", f"  {'stage':14s} {'metric':32s} {'before':>8s} {'after':>8s}  paired diff [95% CI]"]
    for r in rows:
        extra = f"  {format_interval(r.paired)} over {r.paired['n']} problems" if r.paired else ""
        before = "-" if r.before is None else f"{r.before:.4f}"
        lines.append(f"  {r.stage:14s} {r.metric:32s} {before:>8s} {r.after:8.4f}{extra}")
    return "\n".join(lines)


__all__ = ["Row", "summary_rows", "summary_table", "WARM_KEYS"]
