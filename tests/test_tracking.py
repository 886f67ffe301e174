"""metrics.jsonl always, wandb offline when asked, read back; plots written; rank 0 only."""

import json
from types import SimpleNamespace

import pytest

from posttrain.plot import main as plot_main
from posttrain.tracking import Tracker, offline_history, read_metrics, wandb_mode


def tracking(**kw):
    base = dict(wandb=False, project="posttrain-test", entity=None, run_name=None, tags=[], mode="offline")
    return SimpleNamespace(**{**base, **kw})


def test_metrics_jsonl_and_plots(tmp_path, capsys):
    t = Tracker(tracking(), tmp_path / "distill", name="t")
    for step in range(5):
        t.log({"distill/loss": 3.0 - step * 0.5, "distill/nan": float("nan")}, step=step)
    t.table("samples", ["prompt", "completion"], [["2+2", "4"]], step=4)
    t.finish()
    records = read_metrics(tmp_path)
    assert [r["distill/loss"] for r in records] == [3.0, 2.5, 2.0, 1.5, 1.0]
    assert records[0]["file"] == "distill/metrics.jsonl" and records[0]["distill/nan"] == "nan"
    assert any(json.loads(line).get("table") == "samples" for line in (tmp_path / "distill/metrics.jsonl").open())
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "metrics" / "distill_loss.png").stat().st_size > 1000


def test_plot_of_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: auto means offline
    assert wandb_mode("auto") == "offline"
    t = Tracker(tracking(wandb=True, mode="auto", tags=["ci"]), tmp_path / "run", config={"lr": 1e-5}, name="t")
    for step in range(3):
        t.log({"loss": 1.0 / (step + 1), "lr": 1e-5}, step=step)
    t.finish()
    rows = offline_history(tmp_path / "run" / "wandb")
    assert [r["loss"] for r in rows] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [r["_step"] for r in rows] == [0, 1, 2]


def test_other_ranks_log_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    t = Tracker(tracking(wandb=True), tmp_path / "run", name="t")
    t.log({"loss": 1.0}, step=0)
    t.finish()
    assert not (tmp_path / "run").exists()


def test_api_key_means_online(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"
