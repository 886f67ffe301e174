"""Run untrusted Python in isolation and say what happened; never in our own process.

    box = Sandbox(timeout_s=5, memory_mb=512, workers=2)
    [res] = box.map([Job(code="print(input())", stdin=b"hi\\n")])
    res.stdout, res.exit_code, res.timed_out, res.killed_reason    # b'hi\\n', 0, False, None

Jobs run in parallel, one per slot. Each slot has its own uid when we are root (held for this
Sandbox alone), and its own bubblewrap sandbox (layers: rewards/isolation.py) whose init is a
trusted zygote: started once, it forks a fresh process for each job, and after the job kills
everything left in the namespace, empties /tmp, checks that its own inheritable state is as it was
and reports the exit status (isolation.ZYGOTE). A job that reached for that state is reported in
`SandboxResult.tamper`, and a zygote whose state changed is replaced. So a job pays a fork, not a
sandbox and interpreter start-up, and no job sees anything of the one before. The job's stdin, stdout and
stderr are pipes made for it alone, handed to the zygote over a socket. The wall clock of a job
starts when it is handed over. The trusted parent (this process) kills at the wall-clock deadline
and at the output cap, reading the pipes incrementally: it kills the sandbox's init, which takes
the whole pid namespace down, and starts the slot's next sandbox in the background.

If isolation cannot be set up, `Sandbox()` raises IsolationError naming what is missing and the fix.
`unsafe=True` runs the same zygote as a plain subprocess (rlimits, cleared environment, each job in
its own session, a scratch working directory emptied after each job; a job's setsid daemons escape)
and logs a warning on every run.
"""
from __future__ import annotations

import array
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from subprocess import DEVNULL, PIPE

from rewards.isolation import (ZYGOTE, UID_BASE, UNSAFE_HINT, FIX_USERNS, IsolationError, SlotCgroup,
                               bwrap_args, claim_uids, find_bwrap, pick_python, seccomp_bpf)

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
    tamper: str | None = None   # the job reached for the slot's trusted state: "seccomp" (a process of it was
                                # killed for aiming a state-changing call at another process), "slot:<what>"
                                # (the zygote's state changed: the sandbox was replaced), both joined by ";"


class Sandbox:
    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
                 workers: int | None = None, unsafe: bool = False, tmpfs_mb: int = 64, max_procs: int = 32,
                 max_file_mb: int = 16, max_open_files: int = 64, python: str | None = None,
                 bwrap: str = "bwrap", uid_base: int = UID_BASE, preload: tuple[str, ...] = ()):
        self.timeout_s, self.max_output_bytes, self.unsafe = timeout_s, max_output_bytes, unsafe
        self.workers = workers or os.cpu_count() or 1
        self.as_root = os.geteuid() == 0 and not unsafe
        self.python = python or (sys.executable if unsafe else pick_python(self.as_root))
        self.max_procs = max_procs
        limits = (memory_mb << 20, max_file_mb << 20, max_procs, max_open_files)
        if unsafe:
            self._scratch = tempfile.TemporaryDirectory(prefix="sandbox-unsafe-")
        where = self._scratch.name if unsafe else "/tmp"
        self._argv = [self.python, "-I", "-S", "-B", "-c", ZYGOTE, *map(str, limits), ",".join(preload), where,
                      "unsafe" if unsafe else "ns"]
        self._slots: SimpleQueue[int] = SimpleQueue()
        for i in range(self.workers):
            self._slots.put(i)
        # Long-lived threads: bwrap's --die-with-parent fires when the thread that spawned it exits.
        self._runners = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox-run")
        self._spawners = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox-spawn")
        self._warm: dict[int, Future] = {}
        self._lock, self._closed = threading.Lock(), False
        self._cgroups: list[SlotCgroup | None] = [None] * self.workers
        self._uid_locks: list[int] = []
        self.uids: list[int] = []  # the slots' uids, when we are root
        self._finalizer = weakref.finalize(self, _release, self._warm, self._cgroups, self._uid_locks)
        if unsafe:
            return
        self.bwrap, self._bpf = find_bwrap(bwrap), seccomp_bpf()
        self._bwrap_args = bwrap_args(self.python, tmpfs_mb)
        self._setpriv = shutil.which("setpriv") if self.as_root else None
        if self.as_root and not self._setpriv:
            log.warning("sandbox: setpriv (util-linux) not found: each launch forks this whole process to "
                        "switch uid, which is slow for a large trainer")
        # One uid per slot, held for this Sandbox alone (see claim_uids), and a cgroup named after it:
        # harness and candidate (each under RLIMIT_AS), the tmpfs pages and the zygote, in one budget.
        if self.as_root:
            claims = claim_uids(uid_base, self.workers)
            self.uids = [uid for uid, _ in claims]
            self._uid_locks.extend(fd for _, fd in claims)
            mem = (2 * memory_mb + tmpfs_mb + 96) << 20
            self._cgroups[:] = [SlotCgroup.create(uid, max_procs + 16, mem) for uid in self.uids]
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

    def cpu_seconds(self) -> float:
        """CPU time used so far by the idle slots' zygotes and the jobs they have finished (from /proc;
        for benchmarks: a job's processes are children of its zygote, not of this process)."""
        total = 0.0
        with self._lock:
            lives = [f.result() for f in self._warm.values() if f.done()]
        for live in lives:
            try:
                fields = Path(f"/proc/{live.zygote_pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
            except (OSError, AttributeError, ValueError, IndexError):
                pass
        return total

    def close(self) -> None:
        """Stop the warm sandboxes and the threads, remove the slots' cgroups, free the uids; idempotent."""
        with self._lock:
            self._closed = True
        _kill_warm(self._warm)  # before the threads end: a spawner thread's exit would SIGKILL its bwrap
        self._spawners.shutdown(wait=True)
        self._runners.shutdown(wait=True)
        self._finalizer()

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
            live = warm.result() if warm else self._spawn(slot)
            if isinstance(live, _Live) and not live.alive():  # died while idle: start another
                live.close()
                live = self._spawn(slot)
            if isinstance(live, SandboxResult):
                return live
            code = job.code.encode() if isinstance(job.code, str) else job.code
            kind = "s" if isinstance(job.code, str) else "m"
            mods = ",".join(m for m in job.preload if m.isidentifier()) or "-"
            payload = f"{len(code)} {int(wall) + 1} {kind}\n".encode() + code + job.stdin
            res = self._communicate(live, mods, payload, wall, job.max_output or self.max_output_bytes)
            with self._lock:  # keep a healthy sandbox; otherwise start the next one now, in the background
                if self._closed or res.killed_reason or not live.alive():
                    live.close()
                    if not self._closed:
                        self._warm[slot] = self._spawners.submit(self._spawn, slot)
                else:
                    self._warm[slot] = _ready(live)
            if cut and res.timed_out:  # stopped by the caller's deadline, not its own time limit
                res.timed_out, res.killed_reason = False, "deadline"
            return res
        finally:
            self._slots.put(slot)

    def _spawn(self, slot: int) -> _Live | SandboxResult:
        """Start a sandbox: bwrap, and inside it the zygote, which then waits for jobs on its socket."""
        t0 = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.unsafe:
            with theirs:
                proc = subprocess.Popen(self._argv, stdin=theirs, stdout=DEVNULL, stderr=PIPE, cwd=self._scratch.name,
                                        env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
            return _Live(proc, None, ours, proc.pid)
        seccomp_r, w = os.pipe()
        os.write(w, self._bpf)  # a few hundred bytes: fits in the pipe buffer
        os.close(w)
        info_r, info_w = os.pipe()    # bwrap writes {"child-pid": N} here: the namespace's init (the zygote)
        block_r, block_w = os.pipe()  # and waits for a byte here before it starts it
        sync = ["--info-fd", str(info_w), "--block-fd", str(block_r)]
        argv = [self.bwrap, *self._bwrap_args, "--seccomp", str(seccomp_r), *sync, "--", *self._argv]
        ids: dict = {}
        if self.as_root:
            uid = self.uids[slot]
            if self._setpriv:  # a vfork spawn; Popen(user=...) would have to fork this process
                argv = [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
            else:
                ids = dict(user=uid, group=uid, extra_groups=[])
        try:
            proc = subprocess.Popen(argv, stdin=theirs, stdout=DEVNULL, stderr=PIPE, env={}, cwd="/",
                                    pass_fds=(seccomp_r, info_w, block_r), **ids)
        except OSError as e:
            ours.close()
            return SandboxResult(b"", str(e).encode(), None, time.monotonic() - t0, False, "sandbox_error")
        finally:
            for fd in (seccomp_r, info_w, block_r):
                os.close(fd)
            theirs.close()
        init = init_pid = None
        try:
            # The init is blocked until we write to block_w, so its pid cannot have been reused yet: a
            # pidfd on it is safe, and killing it (not bwrap) lets bwrap reap it, leaving no zombie for
            # the machine's init to collect (this one's init is slow to: they piled up to pids.max).
            pid = _read_info_pid(info_r, t0 + 30.0)
            init = os.pidfd_open(pid) if pid else None
            init_pid = pid
            if self._cgroups[slot] and pid:  # before it starts: every descendant inherits the cgroup
                self._cgroups[slot].attach(pid)
        except OSError:
            pass
        finally:
            os.close(info_r)
            os.close(block_w)
        return _Live(proc, init, ours, init_pid)

    def _communicate(self, live: _Live, mods: str, payload: bytes, wall: float, cap: int) -> SandboxResult:
        """Hand the job to the zygote with pipes of its own; feed stdin, read stdout/stderr incrementally
        up to the cap, kill at the deadline or the cap. The zygote's status message comes after every
        process of the job is dead, so the pipes then hold all there is."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.monotonic()
        deadline = t0 + wall
        out = {out_r: bytearray(), err_r: bytearray()}
        try:
            live.ctl.sendmsg([mods.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                array.array("i", [in_r, out_w, err_w]))])
        except OSError as e:  # the zygote is gone: the sandbox is broken, not the job
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            why = live.stderr_tail()
            live.close()
            return SandboxResult(b"", f"sandbox died ({e}): ".encode() + why, None, 0.0, False, "sandbox_error")
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        sel = selectors.DefaultSelector()
        for fd in (in_w, out_r, err_r, live.ctl.fileno()):
            if fd != live.ctl.fileno():
                os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_WRITE if fd == in_w else selectors.EVENT_READ)
        view, reason, status = memoryview(payload), None, None
        if not view:
            sel.unregister(in_w)
            os.close(in_w)
            in_w = -1
        try:
            while reason is None and status is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = "timeout"
                    break
                for key, _ in sel.select(left):
                    if key.fd == live.ctl.fileno():
                        try:
                            msg = live.ctl.recv(64)
                        except OSError:
                            msg = b""  # b"" (or a reset): the zygote died
                        if msg.startswith(b"p"):  # the job's pid (in its namespace), then its status
                            live.job_pid = int(msg[1:])
                            continue
                        status = msg
                        break
                    if key.fd == in_w:
                        try:
                            view = view[os.write(in_w, view[:1 << 16]):]
                        except BrokenPipeError:  # the code stopped reading: its business
                            view = view[:0]
                        if not view:
                            sel.unregister(in_w)
                            os.close(in_w)
                            in_w = -1
                    elif not _read(key.fd, out[key.fd], cap, sel, drain=False):
                        reason = "output_cap"
                        break
            if status is not None and reason is None:
                if not all(_read(fd, out[fd], cap, sel, drain=True) for fd in (out_r, err_r)):
                    reason = "output_cap"
                if not status:
                    reason = "sandbox_error"
        finally:
            sel.close()
            for fd in (in_w, out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            if reason == "sandbox_error":
                out[err_r] += b"\nsandbox: the zygote died: " + live.stderr_tail()
            if reason is not None:
                live.close()  # a job still running (or a broken sandbox): the namespace goes down with its init
        # `<exit code> <ok|retire> <notes>`: retire when the job left what the zygote could not clean or
        # changed the zygote itself; the zygote exits then and the slot gets a fresh sandbox.
        fields = status.decode(errors="replace").split() if status else []
        exit_code = int(fields[0]) if fields and reason is None else None
        if fields[1:2] == ["retire"]:
            live.close()
        tamper = fields[2] if len(fields) > 2 and fields[2] != "-" else None
        if tamper:
            log.warning("code sandbox: a job reached for its slot's trusted state (%s); %s", tamper,
                        "the slot's sandbox was replaced" if "slot:" in tamper else "the process that tried was killed")
        return SandboxResult(bytes(out[out_r]), bytes(out[err_r]), exit_code, time.monotonic() - t0,
                             reason == "timeout", reason, tamper)


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
    """A started sandbox: bwrap (or, unsafe, the zygote itself), a pidfd on the namespace's init (the
    zygote), and our end of its control socket."""

    def __init__(self, proc: subprocess.Popen, init: int | None, ctl: socket.socket, zygote_pid: int | None):
        self.proc, self.init, self.ctl, self.zygote_pid = proc, init, ctl, zygote_pid
        self.job_pid: int | None = None  # the running job's pid; used in unsafe mode only

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self) -> bytes:
        """What bwrap or the zygote said before dying (they write nothing otherwise)."""
        try:
            self.proc.wait(2.0)  # it is dying: let it finish saying why
        except subprocess.TimeoutExpired:
            return b""
        try:
            return self.proc.stderr.read()[-2000:]
        except (OSError, ValueError):
            return b""

    def close(self) -> None:
        """Kill what still runs and reap it. Killing the init takes the whole pid namespace down;
        bwrap then reaps it and exits. Unsafe mode has no namespace: kill the zygote's process group
        (a running job is in a session of its own: its process group too)."""
        if self.proc.poll() is None:
            if self.init is not None:
                try:
                    signal.pidfd_send_signal(self.init, signal.SIGKILL)
                    self.proc.wait(2.0)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            else:
                for group in (self.job_pid, self.proc.pid):
                    try:
                        os.killpg(group, signal.SIGKILL) if group else None
                    except (ProcessLookupError, PermissionError):
                        pass
            if self.proc.poll() is None:
                self.proc.kill()
        self.proc.wait()
        if self.init is not None:
            os.close(self.init)
            self.init = None
        self.ctl.close()
        if self.proc.stderr:
            self.proc.stderr.close()


def _ready(live: _Live) -> Future:
    fut: Future = Future()
    fut.set_result(live)
    return fut


def _release(warm: dict[int, Future], cgroups: list[SlotCgroup | None], uid_locks: list[int]) -> None:
    """Everything a Sandbox holds on the machine: its sandboxes, its slots' cgroups, its uids."""
    _kill_warm(warm)
    for group in cgroups:
        if group is not None:
            group.remove()
    for fd in uid_locks:
        os.close(fd)
    uid_locks.clear()


def _kill_warm(warm: dict[int, Future]) -> None:
    for fut in list(warm.values()):
        if not fut.cancel():
            live = fut.result()  # a spawn in progress: let it finish, then stop it
            if isinstance(live, _Live):
                live.close()
    warm.clear()
