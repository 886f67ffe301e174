"""`python -m posttrain.plot RUN_DIR`: a dashboard per stage and a summary figure with the summary table's
numbers (posttrain/dashboard.py, posttrain/summary.py), on a run directory laid out as train.py writes it."""
from __future__ import annotations

import json

from posttrain.dashboard import dashboard_panels, series_of, summary_figure
from posttrain.plot import main as plot_main
from posttrain.summary import summary_rows, summary_table
from posttrain.tracking import read_metrics

SUMMARIES = {
    "distill": {"before": {"eval/kl": 1.04, "eval/top1": 0.63, "eval/tokens": 900},
                "after": {"eval/kl": 0.31, "eval/top1": 0.87, "eval/tokens": 900}},
    "warm": {"probe_accuracy": 0.9, "member_accuracy": [0.71, 0.74], "mean_member_accuracy": 0.725,
             "ens_accuracy": 0.76, "warm_accuracy": 0.78},
    "policy": {"algorithm": "bond", "bond": {
        "before": {"eval/verifier": 0.20, "eval/verifier_se": 0.02, "eval/safety/harmful_refusal": 0.1},
        "after": {"eval/verifier": 0.27, "eval/verifier_se": 0.02, "eval/safety/harmful_refusal": 0.3},
        "paired": {"n": 256, "before": 0.20, "after": 0.27, "diff": 0.07, "lo": 0.04, "hi": 0.10, "se": 0.015,
                   "level": 0.95}}},
}


def write_run(root):
    run = root / "demo"
    records = {
        "distill": [{"step": s, "loss": 2.0 - 0.1 * s, "grad_norm": 1.0 + s, "eval/kl": 1.0 - 0.05 * s,
                     "eval/top1": 0.6 + 0.02 * s} for s in range(5)],
        "warm": [{"step": s, f"member_{m}/loss": 0.7 - 0.01 * s, f"member_{m}/grad_norm": 2.0,
                  f"member_{m}/train_accuracy": 0.6} for s in range(1, 4) for m in (0, 1)],
        "policy": [{"step": 0, "bond/eval/verifier": 0.20, "bond/eval/verifier_se": 0.02}]
        + [{"step": s, "bond/reward": 0.3 + 0.01 * s, "bond/loss": 1.0, "bond/bond/kl": 0.01 * s,
            "bond/grad_norm": 3.0, "bond/response_length": 12.0} for s in range(1, 5)]
        + [{"step": 4, "bond/eval/verifier": 0.27, "bond/eval/verifier_se": 0.02,
            "bond/eval/safety/harmful_refusal": 0.3}],
    }
    for stage, recs in records.items():
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps({"time": 0.0, **r}) + "\n" for r in recs))
    (run / "resolved_config.yaml").write_text("name: demo\n")
    (run / "summary.json").write_text(json.dumps(SUMMARIES))
    (run / "policy" / "summary.json").write_text(json.dumps(SUMMARIES["policy"]))  # a stage's own: not the run's
    return run


def test_every_stage_gets_a_dashboard_and_the_run_a_summary_figure(tmp_path, capsys):
    run = write_run(tmp_path)
    assert plot_main([str(tmp_path)]) == 0
    plots = tmp_path / "plots"
    for name in ("summary", "dashboard_distill", "dashboard_warm", "dashboard_bond"):
        assert (plots / f"{name}.png").stat().st_size > 5000, name
    assert not (plots / "dashboard_warp.png").exists()  # no WARP in this run: no empty dashboard
    assert (plots / "metrics" / "bond_reward.png").exists()
    assert "read summary.png" in capsys.readouterr().out
    series = series_of([r for r in read_metrics(run) if r["file"] == "policy/metrics.jsonl"])
    panels = dict(dashboard_panels("bond", series))
    assert panels["reward: training rollouts and held-out verifier"] == ["bond/eval/verifier", "bond/reward"]
    assert panels["gradient norm (before clipping)"] == ["bond/grad_norm"]
    assert "held-out safety" in panels and "KL to the anchor" in panels
    distill = dict(dashboard_panels("distill", series_of([r for r in read_metrics(run)
                                                          if r["file"] == "distill/metrics.jsonl"])))
    assert distill["held-out KL(teacher || student)"] == ["eval/kl"] and "gradient norm (before clipping)" in distill


def test_the_summary_figure_draws_the_summary_tables_numbers(tmp_path):
    rows = summary_rows(SUMMARIES)
    drawn = summary_figure(rows, tmp_path / "summary.png")
    table = summary_table(rows)
    assert drawn == {(r.stage, r.metric): (r.before, r.after) for r in rows}
    assert ("warm", "member_1_accuracy") in drawn and ("policy/bond", "eval/safety/harmful_refusal") in drawn
    for (stage, metric), (before, after) in drawn.items():
        line = next(line for line in table.splitlines() if line.split()[:2] == [stage, metric])
        assert f"{after:.4f}" in line and (before is None or f"{before:.4f}" in line)
    verifier = next(line for line in table.splitlines() if "eval/verifier " in line)
    assert "+0.070 [+0.040, +0.100] over 256 problems" in verifier
    assert "eval/tokens" not in table
