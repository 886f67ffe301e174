"""Experiment tracking: wandb on rank 0, and always a metrics.jsonl in the run directory.

    tracker = Tracker(cfg.tracking, run_dir=cfg.out_dir, config=cfg.model_dump(), name=cfg.name)
    tracker.log({"distill/loss": 2.3, "distill/lr": 1e-5}, step=10)
    tracker.table("policy/samples", ["prompt", "completion", "reward"], rows, step=10)
    tracker.finish()

wandb mode "auto" is online when an API key is configured (WANDB_API_KEY, or a `wandb login`
entry in ~/.netrc) and offline otherwise, so a run never blocks on a login prompt; offline runs
sync later with `wandb sync <run_dir>/wandb/offline-run-*`. Ranks other than 0 log nothing.
`metrics.jsonl` holds one JSON object per log call: {"step", "time", **metrics}.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def wandb_mode(mode: str) -> str:
    """Resolve "auto" to "online" when a wandb API key is configured, else "offline"."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError):
        auth = None
    return "online" if auth else "offline"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of failing the run
    return value


class Tracker:
    """Logs metrics to metrics.jsonl and (optionally) wandb, on rank 0 only."""

    def __init__(self, tracking, run_dir: str | os.PathLike, config: dict | None = None, name: str = "run",
                 group: str | None = None):
        self.enabled = rank() == 0
        self.run_dir = Path(run_dir)
        self.wandb_run = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: survives a kill
        mode = wandb_mode(tracking.mode) if tracking.wandb else "disabled"
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=tracking.project, entity=tracking.entity, name=tracking.run_name or name,
                tags=list(tracking.tags), config=config, dir=str(self.run_dir), mode=mode, group=group,
                resume="allow", id=self._run_id(name),
            )

    def _run_id(self, name: str) -> str:
        """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
        path = self.run_dir / "wandb_run_id"
        if path.exists():
            return path.read_text().strip()
        run_id = f"{name[:40]}-{secrets.token_hex(4)}"
        path.write_text(run_id)
        return run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: _jsonable(v) for k, v in metrics.items()}, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (e.g. sampled prompts, completions and rewards): a wandb.Table and a jsonl record."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "table": key, "columns": columns,
                                      "rows": [[_jsonable(v) for v in r] for r in rows]}) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0):
    """A tqdm progress bar with ETA on rank 0; silent elsewhere."""
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=rank() != 0, dynamic_ncols=True)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every metrics record (not tables) of metrics.jsonl files at or below run_dir, with a "file" key."""
    records = []
    for path in sorted(Path(run_dir).rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "table" not in rec:
                    records.append({"file": str(path.relative_to(run_dir)), **rec})
    return records


# ----------------------------------------------------------------------------- offline wandb files

def _wandb_records(path: Path) -> Iterator[bytes]:
    """Raw records of a .wandb transaction log: a 7-byte ':W&B' header, then LevelDB-log-style
    32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full/first/middle/last)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        elif kind == 0 and length == 0:
            pos += block - pos % block if pos % block else 0


def offline_history(wandb_dir: str | os.PathLike) -> list[dict]:
    """The history rows logged to an offline wandb run directory (offline-run-*/run-*.wandb)."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(wandb_dir).rglob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file below {wandb_dir}")
    rows = []
    for path in files:
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                row = {}
                for item in record.history.item:
                    key = item.key or ".".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows
