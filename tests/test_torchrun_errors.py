"""A config mistake under two ranks: train.py prints one `error:` line and exits 2 on every rank;
`python -m posttrain.launch` (torchrun's own entry point) then adds one line, not torchrun's traceback,
and exits with the rank's status. Plain torchrun still appends its ChildFailedError summary (exit 1)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_error_line_and_status_2_under_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "posttrain.launch", "--nproc_per_node=2", str(ROOT / "train.py"), "recipe=smoke",
           "nosuchkey=1", f"run_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nosuchkey" in errors[0], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    assert "posttrain.launch: 2 rank(s) failed" in res.stderr
