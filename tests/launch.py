"""Run train.py as users do, in real processes: `python train.py ...` or torchrun with N ranks (tests' helper)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_py(args: list[str], *, ranks: int = 1, wait: bool = True, timeout: float = 300):
    """One thread per process, wandb silent and keyless. wait=False returns the Popen (its own process
    group, so a test can kill torchrun and its ranks together); else the finished CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
