"""Killable worker processes: for reward work that may hang in C code or eat memory.

`WorkerPool("module:function", workers, memory_mb)` keeps long-lived workers (started with
`python -c`, never forked from a threaded parent), each with an address-space limit (RLIMIT_AS)
and a per-task CPU-time backstop. Tasks travel as JSON lines; a task past its deadline gets its
worker SIGKILLed and replaced, and comes back as an `Outcome` with status "timeout". The math
reward runs Math-Verify this way; see base.py for why threads are not enough.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import Any, Literal, NamedTuple, Optional, Sequence

from .base import RewardError

logger = logging.getLogger("rewards")

# ----------------------------------------------------------------------------- killable worker processes

class Outcome(NamedTuple):
    status: Literal["ok", "error", "timeout"]
    value: Any          # the function's (JSON) return value when ok
    error: str          # why, when not ok
    seconds: float


class _Worker:
    def __init__(self, proc: subprocess.Popen, log: Any):
        self.proc, self.log = proc, log
        self.ready = False
        self.buf = b""
        self.task: Optional[int] = None
        self.t_end = 0.0
        self.t0 = 0.0


def _kill_all(workers: list) -> None:
    for w in workers:
        _stop(w)


def _stop(w: _Worker) -> None:
    try:
        w.proc.kill()
    except OSError:
        pass
    try:
        w.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # only if the kernel is stuck; nothing more we can do
        pass
    for f in (w.proc.stdin, w.proc.stdout, w.log):
        try:
            f.close()
        except (OSError, ValueError):
            pass


class WorkerPool:
    """Long-lived worker processes that run `module:function` on keyword arguments, each task
    with a hard deadline: a worker past it is killed (SIGKILL) and a fresh one started.

        pool = WorkerPool("rewards.math:check_equivalent", workers=2, memory_mb=1024)
        pool.run([{"gold": "1/2", "pred": "0.5"}], timeout_s=2.0)   # [Outcome("ok", True, "", 0.01)]

    - Each worker limits its own address space (RLIMIT_AS = memory_mb) after its imports, so a
      runaway allocation is a MemoryError (an error outcome), never the host's OOM killer.
    - Each task also sets a CPU-time limit (RLIMIT_CPU) a little above its deadline: a worker
      orphaned by a crashed parent cannot spin forever.
    - If the target's module defines `warmup_worker()`, each worker runs it before it reports
      ready (the math module parses a first expression there, which imports sympy's parsers).
    - Tasks and results travel as JSON lines over pipes: arguments and return values must be
      JSON values (str, number, bool, None, lists, dicts).
    - Workers start with `python -c`, not fork: forking a parent with threads (ours has reward
      and torch threads) can copy a held lock into the child and deadlock it.
    - `run` is thread-safe (one batch at a time). Workers idle between batches; `close()` (or
      garbage collection, or interpreter exit) kills them.
    """

    def __init__(self, target: str, workers: int = 2, memory_mb: int | None = 1024,
                 startup_timeout_s: float = 60.0):
        if ":" not in target:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.target, self.size, self.memory_mb, self.startup_timeout_s = target, workers, memory_mb, startup_timeout_s
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self.restarts = 0
        for _ in range(workers):
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        log = tempfile.TemporaryFile()  # the worker's stderr, read back if it dies while starting
        proc = subprocess.Popen(
            [sys.executable, "-c", "from rewards.workers import _worker_main; _worker_main()",
             self.target, str(self.memory_mb or 0)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, close_fds=True)
        return _Worker(proc, log)

    def _replace(self, w: _Worker) -> _Worker:
        _stop(w)
        fresh = self._spawn()
        self._workers[self._workers.index(w)] = fresh
        self.restarts += 1
        return fresh

    def close(self) -> None:
        with self._lock:
            self._finalizer()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker has started (imports and warm-up done); for benchmarks and tests."""
        end = time.monotonic() + (self.startup_timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            self._run([], 0.0, None, until_ready=end)

    def run(self, tasks: Sequence[dict], timeout_s: float, deadline_s: float | None = None) -> list[Outcome]:
        """Run every task (keyword arguments of the target) with `timeout_s` each, at most
        `deadline_s` seconds in all (tasks not finished by then time out). Returns one Outcome
        per task, in order."""
        with self._lock:
            if not self._finalizer.alive:
                raise RewardError(f"worker pool for {self.target} is closed")
            return self._run(list(tasks), timeout_s, deadline_s)

    def _run(self, tasks: list[dict], timeout_s: float, deadline_s: float | None,
             until_ready: float | None = None) -> list[Outcome]:
        t_start = time.monotonic()
        end_all = None if deadline_s is None else t_start + deadline_s
        results: list[Optional[Outcome]] = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        startup_failures = 0
        last_progress = t_start
        sel = selectors.DefaultSelector()
        try:
            while todo or any(w.task is not None for w in self._workers) or until_ready is not None:
                now = time.monotonic()
                if until_ready is not None and (all(w.ready for w in self._workers) or now >= until_ready):
                    if not all(w.ready for w in self._workers):
                        raise RewardError(f"{self.target} workers not ready in time")
                    break
                # 1. out of overall time: whatever is queued or running times out
                if end_all is not None and now >= end_all:
                    for w in list(self._workers):
                        if w.task is not None:
                            results[w.task] = Outcome("timeout", None, "overall deadline", now - w.t0)
                            self._replace(w)
                    for i in todo:
                        results[i] = Outcome("timeout", None, "not started before the overall deadline", 0.0)
                    break
                # 2. tasks past their own deadline: kill and replace their worker
                for w in list(self._workers):
                    if w.task is not None and now >= w.t_end:
                        results[w.task] = Outcome("timeout", None, f"no result within {timeout_s:g} s", now - w.t0)
                        self._replace(w)
                # 3. hand queued tasks to idle ready workers
                for w in self._workers:
                    if todo and w.ready and w.task is None:
                        i = todo.popleft()
                        cpu_s = math.ceil(timeout_s) + 2
                        try:
                            w.proc.stdin.write((json.dumps({"args": tasks[i], "cpu_s": cpu_s}) + "\n").encode())
                            w.proc.stdin.flush()
                        except (BrokenPipeError, OSError):
                            todo.appendleft(i)
                            w.ready = False  # it died; EOF on its stdout replaces it below
                            continue
                        w.task, w.t0, w.t_end = i, time.monotonic(), time.monotonic() + timeout_s
                if not todo and all(w.task is None for w in self._workers) and until_ready is None:
                    break
                if not any(w.ready for w in self._workers) and time.monotonic() - last_progress > self.startup_timeout_s:
                    raise RewardError(f"no {self.target} worker became ready in {self.startup_timeout_s:g} s")
                # 4. wait for output (results, or "ready" from starting workers) until the next deadline
                waits = [w.t_end for w in self._workers if w.task is not None]
                if end_all is not None:
                    waits.append(end_all)
                wait = max(0.0, min(waits) - time.monotonic()) if waits else 1.0
                listening = {w.proc.stdout.fileno(): w for w in self._workers if w.task is not None or not w.ready}
                for fd, w in listening.items():
                    sel.register(fd, selectors.EVENT_READ, w)
                events = sel.select(timeout=min(wait, 1.0))
                for fd in listening:
                    sel.unregister(fd)
                for key, _ in events:
                    w: _Worker = key.data
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:  # the worker died: OOM kill, SIGXCPU, a crash in its imports
                        if w.task is not None:
                            code = w.proc.poll()
                            results[w.task] = Outcome("error", None, f"worker died (exit status {code})",
                                                      time.monotonic() - w.t0)
                        elif not w.ready:
                            startup_failures += 1
                            if startup_failures > 2 * self.size:
                                w.log.seek(0)
                                tail = w.log.read()[-2000:].decode(errors="replace")
                                raise RewardError(f"{self.target} workers fail to start:\n{tail}")
                        self._replace(w)
                        continue
                    w.buf += chunk
                    while b"\n" in w.buf:
                        line, w.buf = w.buf.split(b"\n", 1)
                        msg = json.loads(line)
                        last_progress = time.monotonic()
                        if "ready" in msg:
                            w.ready = True
                        elif w.task is not None:
                            took = time.monotonic() - w.t0
                            results[w.task] = (Outcome("ok", msg["ok"], "", took) if "ok" in msg
                                               else Outcome("error", None, msg["error"], took))
                            w.task = None
        finally:
            sel.close()
            for w in list(self._workers):
                if w.task is not None:  # only after an exception above: never leave a worker marked busy
                    self._replace(w)
        return [r if r is not None else Outcome("error", None, "lost", 0.0) for r in results]


def _worker_main() -> None:
    """Entry point of a WorkerPool process: argv = [target, memory_mb]. JSON lines in and out."""
    import importlib

    target, memory_mb = sys.argv[1], int(sys.argv[2])
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    sys.stdout = sys.stderr
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    fn = getattr(mod, attr)
    warmup = getattr(mod, "warmup_worker", None)
    if callable(warmup):  # lazy imports and caches, before "ready": the first task's deadline is not spent on them
        warmup()
    if memory_mb:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        task = json.loads(line)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime) + int(task["cpu_s"])
        if cpu_hard == resource.RLIM_INFINITY or soft < cpu_hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
        try:
            reply = {"ok": fn(**task["args"])}
        except MemoryError:
            reply = {"error": f"MemoryError: over the {memory_mb} MB limit"}
        except Exception as e:  # noqa: BLE001 - reported to the parent as this task's error
            reply = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        try:
            text = json.dumps(reply)
        except (TypeError, ValueError) as e:
            text = json.dumps({"error": f"result is not JSON: {e}"})
        channel.write(text + "\n")
