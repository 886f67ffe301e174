"""Write PNG figures of a run: `python -m posttrain.plot RUN_DIR [--out DIR]`.

Reads every metrics.jsonl at or below RUN_DIR (one per stage) and the run's summary.json, and writes
into RUN_DIR/plots/ (or --out):
- summary.png: the run's held-out results before and after each stage, the numbers of the summary
  table train.py prints at the end (posttrain/summary.py); read it first;
- dashboard_<stage>.png: one grid of curves per stage (posttrain/dashboard.py lists the panels);
- metrics/<metric>.png: every logged metric on its own, step on the x axis, one line per file.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

from .dashboard import dashboards, summary_figure
from .summary import summary_rows
from .tracking import read_metrics


def _summaries(run_dir: Path) -> dict:
    """The run's summary.json: train.py writes it beside resolved_config.yaml in <run_dir>/<name>/; RUN_DIR
    may be that directory or the one above it (one run). {} when there is none (a stage's directory)."""
    import json

    runs = [d for d in (run_dir, *sorted(run_dir.glob("*/"))) if (d / "resolved_config.yaml").exists()]
    if len(runs) == 1 and (runs[0] / "summary.json").exists():
        return json.loads((runs[0] / "summary.json").read_text())
    return {}


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics.jsonl with metrics below {run_dir}; is it a run directory?")
    out = Path(out) if out else run_dir / "plots"
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    summaries = _summaries(run_dir)
    written = []
    if rows := summary_rows(summaries):
        summary_figure(rows, out / "summary.png")
        written.append(out / "summary.png")
    by_file: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_file[rec["file"]].append(rec)
    written += dashboards(by_file, summaries, out)
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        for key, value in rec.items():
            if key not in ("file", "step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series[key][rec["file"]].append((rec["step"], value))
    for key, lines in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for file, points in sorted(lines.items()):
            steps, values = zip(*points)
            label = str(Path(file).parent) if len(lines) > 1 else None
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / "metrics" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posttrain.plot", description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = ap.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} plots to {written[0].parent}: read summary.png, then dashboard_<stage>.png; "
          "one PNG per metric under metrics/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
