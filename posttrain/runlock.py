"""One run per run directory: <run_dir>/<name>/run.lock, held by the run's rank 0 while it lives.

    lock = RunLock.acquire(cfg.out_dir)     # UserError if another live process holds it
    ...
    lock.release()                          # or let the process end: the kernel releases it

The lock is a POSIX record lock (fcntl F_SETLK, Python's lockf) on the file. It belongs to the
process that took it: the kernel releases it when that process ends in any way, SIGKILL included,
so a lock left by a killed run is stale by construction and the next run (a `resume=true`) takes
it over. Unlike flock, it is not inherited by children: a reward's worker process or a sandbox
that outlives a killed run for a moment cannot keep its directory locked. The file's text names the
holder (pid, host, start time) for the error message; each new holder rewrites it. The lock is
advisory; on a network file system it holds across nodes where the file system forwards POSIX
locks (NFSv3 with lockd, NFSv4 and Lustre do; check yours).
"""

from __future__ import annotations

import errno
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
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
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return f"the process holding {path}"


__all__ = ["RunLock", "LOCK_NAME"]
