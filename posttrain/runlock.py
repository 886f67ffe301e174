"""One run per run directory: <run_dir>/<name>/run.lock, held by the run's rank 0 while it lives.

    lock = RunLock.acquire(cfg.out_dir)     # UserError if another live process holds it
    ...
    lock.release()                          # or let the process end: the kernel releases it

The lock is an flock(2) on the file, so it is released by the kernel when its process ends in any
way, SIGKILL included: a lock left by a killed run is stale by construction and the next run (a
`resume=true`) takes it over. The file's text names the holder (pid, host, start time) for the
error message; it is rewritten by each new holder. flock is advisory and local to a machine's
kernel on most network file systems, so two nodes pointed at one shared run directory are guarded
only when that file system forwards flock (NFSv4 and Lustre do; check yours).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK_NAME = "run.lock"


class RunLock:
    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, what: str = "run") -> "RunLock":
        """Take the run directory's lock, or raise a UserError naming the process that holds it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(path)
            os.close(fd)
            raise UserError(f"{run_dir} is in use by another run ({holder}); two runs in one directory would "
                            f"write over each other's checkpoints and metrics; fix: give this {what} another "
                            f"name= (or run_dir=), or wait for that run to end") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return f"the process holding {path}"


__all__ = ["RunLock", "LOCK_NAME"]
