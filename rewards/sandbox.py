"""Run untrusted Python in isolation and say what happened; never in our own process.

    box = Sandbox(timeout_s=5, memory_mb=512, workers=2)
    [res] = box.map([Job(code="print(input())", stdin=b"hi\\n")])
    res.stdout, res.exit_code, res.timed_out, res.killed_reason    # b'hi\\n', 0, False, None

Each job runs in a fresh bubblewrap sandbox (layers: rewards/isolation.py). Jobs run in parallel,
one per slot; each slot has its own uid when we are root, and keeps its next sandbox started in
advance (a "warm" sandbox: namespaces set up, interpreter started, rlimits set, blocked on stdin),
so the launch latency overlaps the previous job. The wall clock of a job starts when its code is
handed over. The trusted parent (this process) kills at the wall-clock deadline and at the output
cap, reading the pipes incrementally; killing bwrap takes the whole pid namespace down.

If isolation cannot be set up, `Sandbox()` raises IsolationError naming what is missing and the fix.
`unsafe=True` runs the same prelude in plain subprocesses (rlimits, cleared environment, own session,
a scratch working directory) and logs a warning on every run.
"""
from __future__ import annotations

import json
import logging
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue
from subprocess import PIPE

from rewards.isolation import (PRELUDE, UID_BASE, UNSAFE_HINT, FIX_USERNS, IsolationError, SlotCgroup,
                               bwrap_args, find_bwrap, pick_python, seccomp_bpf)

log = logging.getLogger(__name__)
__all__ = ["Job", "Sandbox", "SandboxResult", "IsolationError"]


@dataclass
class Job:
    code: str | bytes             # Python source, or Sandbox.compile(source); runs as __main__
    stdin: bytes = b""            # what the code reads from fd 0
    wall_s: float | None = None   # wall-clock limit; None: the sandbox's timeout_s
    max_output: int | None = None  # cap on stdout and on stderr; None: the sandbox's max_output_bytes
    preload: tuple[str, ...] = ()  # stdlib modules to import before the code runs (not on its clock)


@dataclass
class SandboxResult:
    stdout: bytes               # at most the cap
    stderr: bytes               # at most the cap
    exit_code: int | None       # negative: killed by that signal; None: never ran
    wall_s: float
    timed_out: bool
    killed_reason: str | None   # "timeout", "output_cap", "deadline" (the map's), "sandbox_error", None


class Sandbox:
    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
                 workers: int | None = None, unsafe: bool = False, tmpfs_mb: int = 64, max_procs: int = 32,
                 max_file_mb: int = 16, max_open_files: int = 64, python: str | None = None,
                 bwrap: str = "bwrap", uid_base: int = UID_BASE, preload: tuple[str, ...] = ()):
        self.timeout_s, self.max_output_bytes, self.unsafe = timeout_s, max_output_bytes, unsafe
        self.workers = workers or os.cpu_count() or 1
        self.as_root = os.geteuid() == 0 and not unsafe
        self.python = python or (sys.executable if unsafe else pick_python(self.as_root))
        self.uid_base, self.max_procs = uid_base, max_procs
        limits = (memory_mb << 20, max_file_mb << 20, max_procs, max_open_files)
        self._argv = [self.python, "-I", "-S", "-B", "-c", PRELUDE, *map(str, limits), ",".join(preload)]
        self._slots: SimpleQueue[int] = SimpleQueue()
        for i in range(self.workers):
            self._slots.put(i)
        # Long-lived threads: bwrap's --die-with-parent fires when the thread that spawned it exits.
        self._runners = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox-run")
        self._spawners = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox-spawn")
        self._warm: dict[int, Future] = {}
        self._lock, self._closed = threading.Lock(), False
        weakref.finalize(self, _kill_warm, self._warm)
        if unsafe:
            self._scratch = tempfile.TemporaryDirectory(prefix="sandbox-unsafe-")
            return
        self.bwrap, self._bpf = find_bwrap(bwrap), seccomp_bpf()
        self._bwrap_args = bwrap_args(self.python, tmpfs_mb)
        self._setpriv = shutil.which("setpriv") if self.as_root else None
        if self.as_root and not self._setpriv:
            log.warning("sandbox: setpriv (util-linux) not found: each launch forks this whole process to "
                        "switch uid, which is slow for a large trainer")
        # Harness and candidate (each under RLIMIT_AS), the tmpfs pages and the warm sandbox, in one budget.
        mem = (2 * memory_mb + tmpfs_mb + 96) << 20
        self._cgroups = [SlotCgroup.create(f"slot{i}", max_procs + 16, mem) if self.as_root else None
                         for i in range(self.workers)]
        probe = self.run("import os; print(os.getuid(), 'ok')", wall_s=max(timeout_s, 20.0))
        if probe.exit_code != 0 or not probe.stdout.endswith(b" ok\n"):
            why = probe.stderr.decode(errors="replace").strip()[-500:] or probe.killed_reason
            self.close()
            fix = FIX_USERNS if "bwrap:" in why else "see the error above"
            raise IsolationError(f"the sandbox could not run a test program ({why}): {fix}, {UNSAFE_HINT}")
        uid = int(probe.stdout.split()[0])
        assert not self.as_root or uid >= uid_base, f"sandbox ran as uid {uid}, not a slot uid"

    def compile(self, source: str, filename: str = "<sandbox>") -> bytes:
        """Compile our own (trusted) source once with the sandbox's interpreter, so runs skip it."""
        script = "import marshal, sys; sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.read(), sys.argv[1], 'exec')))"
        out = subprocess.run([self.python, "-I", "-S", "-c", script, filename], input=source.encode(),
                             capture_output=True, check=True, timeout=60)
        return out.stdout

    def run(self, code: str | bytes, stdin: bytes = b"", wall_s: float | None = None) -> SandboxResult:
        return self.map([Job(code, stdin, wall_s)])[0]

    def map(self, jobs: list[Job], deadline: float | None = None) -> list[SandboxResult]:
        """Run jobs in parallel, one per free slot; results in the order of `jobs`. With a `deadline`
        (time.monotonic()), no job runs past it: those not started by then come back as "deadline"."""
        if self.unsafe:
            log.warning("code sandbox: UNSAFE mode, running %d untrusted program(s) WITHOUT isolation "
                        "(rlimits only)", len(jobs))
        return list(self._runners.map(lambda job: self._run_in_slot(job, deadline), jobs))

    def close(self) -> None:
        """Stop the warm sandboxes and the threads; idempotent."""
        with self._lock:
            self._closed = True
        _kill_warm(self._warm)  # before the threads end: a spawner thread's exit would SIGKILL its bwrap
        self._spawners.shutdown(wait=True)
        self._runners.shutdown(wait=True)

    # --- one job ---------------------------------------------------------------------------------------

    def _run_in_slot(self, job: Job, deadline: float | None) -> SandboxResult:
        slot = self._slots.get()
        try:
            wall = job.wall_s or self.timeout_s
            cut = deadline is not None and deadline - time.monotonic() < wall  # the caller's deadline comes first
            if cut:
                wall = deadline - time.monotonic()
                if wall <= 0:
                    return SandboxResult(b"", b"", None, 0.0, False, "deadline")
            with self._lock:
                warm = self._warm.pop(slot, None)
                if not self._closed:  # start the slot's next sandbox now, while this job runs
                    self._warm[slot] = self._spawners.submit(self._spawn, slot)
            live = warm.result() if warm else self._spawn(slot)
            if isinstance(live, _Live) and live.proc.poll() is not None:  # died while waiting
                live.close()
                live = self._spawn(slot)
            if isinstance(live, SandboxResult):
                return live
            code = job.code.encode() if isinstance(job.code, str) else job.code
            kind = "s" if isinstance(job.code, str) else "m"
            mods = ",".join(m for m in job.preload if m.isidentifier()) or "-"
            payload = f"{len(code)} {int(wall) + 1} {kind} {mods}\n".encode() + code + job.stdin
            res = self._communicate(live, payload, time.monotonic(), wall, job.max_output or self.max_output_bytes)
            if cut and res.timed_out:  # stopped by the caller's deadline, not its own time limit
                res.timed_out, res.killed_reason = False, "deadline"
            return res
        finally:
            self._slots.put(slot)

    def _spawn(self, slot: int) -> _Live | SandboxResult:
        """Start a sandbox up to the point where it waits for its job on stdin."""
        t0 = time.monotonic()
        if self.unsafe:
            return _Live(subprocess.Popen(self._argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, cwd=self._scratch.name,
                                          env={"PATH": "/usr/bin:/bin"}, start_new_session=True), None)
        seccomp_r, w = os.pipe()
        os.write(w, self._bpf)  # a few hundred bytes: fits in the pipe buffer
        os.close(w)
        info_r, info_w = os.pipe()    # bwrap writes {"child-pid": N} here: the namespace's init (our prelude)
        block_r, block_w = os.pipe()  # and waits for a byte here before it starts it
        sync = ["--info-fd", str(info_w), "--block-fd", str(block_r)]
        argv = [self.bwrap, *self._bwrap_args, "--seccomp", str(seccomp_r), *sync, "--", *self._argv]
        ids: dict = {}
        if self.as_root:
            uid = self.uid_base + slot
            if self._setpriv:  # a vfork spawn; Popen(user=...) would have to fork this process
                argv = [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
            else:
                ids = dict(user=uid, group=uid, extra_groups=[])
        try:
            proc = subprocess.Popen(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, env={}, cwd="/",
                                    pass_fds=(seccomp_r, info_w, block_r), **ids)
        except OSError as e:
            return SandboxResult(b"", str(e).encode(), None, time.monotonic() - t0, False, "sandbox_error")
        finally:
            for fd in (seccomp_r, info_w, block_r):
                os.close(fd)
        init = None
        try:
            # The init is blocked until we write to block_w, so its pid cannot have been reused yet: a
            # pidfd on it is safe, and killing it (not bwrap) lets bwrap reap it, leaving no zombie for
            # the machine's init to collect (this one's init is slow to: they piled up to pids.max).
            pid = _read_info_pid(info_r, t0 + 30.0)
            init = os.pidfd_open(pid) if pid else None
            if self._cgroups[slot] and pid:  # before it starts: every descendant inherits the cgroup
                self._cgroups[slot].attach(pid)
        except OSError:
            pass
        finally:
            os.close(info_r)
            os.close(block_w)
        return _Live(proc, init)

    def _communicate(self, live: _Live, payload: bytes, t0: float, wall: float, cap: int) -> SandboxResult:
        """Feed stdin, read stdout/stderr incrementally up to the cap, kill at the deadline or the cap.
        A pidfd says when the process exits (Popen.wait(timeout) polls with sleeps of up to 50 ms)."""
        deadline, proc = t0 + wall, live.proc
        fin, fout, ferr = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
        out = {fout: bytearray(), ferr: bytearray()}
        pidfd = os.pidfd_open(proc.pid)
        sel = selectors.DefaultSelector()
        for fd in (fin, fout, ferr, pidfd):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_WRITE if fd == fin else selectors.EVENT_READ)
        view, reason, exited = memoryview(payload), None, False
        try:
            while reason is None and not exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = "timeout"
                    break
                for key, _ in sel.select(left):
                    if key.fd == pidfd:
                        exited = True  # drained below: what it wrote before exiting is in the pipes
                    elif key.fd == fin:
                        try:
                            view = view[os.write(fin, view[:1 << 16]):]
                        except BrokenPipeError:  # the code stopped reading: its business
                            view = view[:0]
                        if not view:
                            sel.unregister(fin)
                            proc.stdin.close()
                    elif not _read(key.fd, out[key.fd], cap, sel, drain=False):
                        reason = "output_cap"
                        break
            if exited and reason is None and not all(_read(fd, out[fd], cap, sel, drain=True) for fd in (fout, ferr)):
                reason = "output_cap"
        finally:
            sel.close()
            os.close(pidfd)
            live.close()
        return SandboxResult(bytes(out[fout]), bytes(out[ferr]), proc.returncode, time.monotonic() - t0,
                             reason == "timeout", reason)


def _read(fd: int, buf: bytearray, cap: int, sel: selectors.BaseSelector, drain: bool) -> bool:
    """Read what is there (all of it if `drain`) into `buf`; False once `buf` passes `cap`."""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except (BlockingIOError, OSError):  # nothing more now, or already closed
            return True
        if not chunk:
            if fd in sel.get_map():
                sel.unregister(fd)
            return True
        buf += chunk
        if len(buf) > cap:
            del buf[cap:]
            return False
        if not drain:
            return True


def _read_info_pid(fd: int, deadline: float) -> int | None:
    """bwrap's --info-fd JSON; None if bwrap died before writing it (its stderr says why)."""
    data = b""
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError):
        return None


class _Live:
    """A started sandbox: bwrap (or, unsafe, the interpreter) and a pidfd on the namespace's init."""

    def __init__(self, proc: subprocess.Popen, init: int | None):
        self.proc, self.init = proc, init

    def close(self) -> None:
        """Kill what still runs and reap it. Killing the init takes the whole pid namespace down;
        bwrap then reaps it and exits. Unsafe mode has no namespace: kill the process group."""
        if self.proc.poll() is None:
            if self.init is not None:
                try:
                    signal.pidfd_send_signal(self.init, signal.SIGKILL)
                    self.proc.wait(2.0)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            else:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
        self.proc.wait()
        if self.init is not None:
            os.close(self.init)
            self.init = None
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def _kill_warm(warm: dict[int, Future]) -> None:
    for fut in list(warm.values()):
        if not fut.cancel():
            live = fut.result()  # a spawn in progress: let it finish, then stop it
            if isinstance(live, _Live):
                live.close()
    warm.clear()
