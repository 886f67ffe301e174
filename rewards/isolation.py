"""The sandbox's building blocks: bubblewrap arguments, the seccomp filter, the in-sandbox zygote that
forks each job and sets its rlimits, per-slot cgroups, and the checks that say what is missing.
rewards/sandbox.py runs them.

Each layer is here because an attack tried on this machine needed it (README, "The code sandbox:
what a job can and cannot touch"; the attacks are tests/test_sandbox*.py):
- bubblewrap with every namespace unshared: no network (a down loopback only), its own pid namespace
  (when its init dies the kernel kills everything inside, double-forked `setsid` daemons included),
  no /proc (nothing to read about other processes, no /proc/<pid>/mem), no nested user namespaces,
  environment cleared, /usr and the interpreter read-only, a size-capped tmpfs on /tmp the only
  writable place, /dev holding null, zero and urandom only, --die-with-parent, --new-session;
- seccomp (`seccomp_bpf`): ptrace, process_vm_*, pidfd_getfd, mount/unshare/setns and the namespace
  flags of clone, kexec, bpf, keyctl, perf, io_uring, modules, TIOCSTI... fail with EPERM; calls that
  change another process's limits, priority, scheduling, affinity or memory placement kill the caller
  (SELF_ONLY): the zygote's state is what every later job of the slot inherits;
- rlimits (`ZYGOTE`, before any untrusted byte runs): address space, CPU seconds, file size,
  processes, open files, no core files; and a wall-clock alarm as a backstop;
- the zygote checks its own state after every job and retires if the job changed it (`ZYGOTE`);
- a dedicated uid per slot when we are root (RLIMIT_NPROC does nothing for uid 0), claimed for one
  Sandbox alone (`claim_uids`), dropped by setpriv so the spawn is a vfork (Popen(user=...) forks the
  whole trainer: 250 ms at 4 GB here);
- a per-slot cgroup (pids.max, memory) where root may create one, named after the slot's uid.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Far above login uids (1000-60000), systemd's DynamicUser range (61184-65519), /etc/subuid ranges
# and systemd's container range (up to 1879048191); no passwd entry is needed.
UID_BASE = 1_900_000_000
FIX_BWRAP = "install bubblewrap (apt-get install -y bubblewrap)"
FIX_USERNS = ("allow unprivileged user namespaces (sysctl -w kernel.unprivileged_userns_clone=1 and "
              "user.max_user_namespaces > 0; in Docker, --security-opt seccomp=unconfined "
              "--security-opt apparmor=unconfined)")
UNSAFE_HINT = "or set unsafe=True to run WITHOUT isolation (a warning is logged on every run)"


class IsolationError(RuntimeError):
    """The sandbox cannot be set up on this machine; the message says what is missing and the fix."""


# The zygote: the sandbox's init (pid 1 of its pid namespace), trusted, started once per slot and
# reused for every job of that slot. It sets nothing on itself but ignores SIGINT (pid 1 then ignores
# every signal sent from inside the namespace, SIGKILL included), imports the sandbox's preload modules
# (argv[5]) and waits on its control socket (fd 0, a SOCK_SEQPACKET pair with the trusted parent). A job
# message is `<modules>` (comma-separated stdlib names, or "-") carrying three descriptors: the job's
# stdin, stdout and stderr, pipes the parent made for this job alone. The zygote imports the modules
# (they stay imported for later jobs, shared by every fork), forks the job process and waits for it.
# The job process takes the three pipes as fds 0-2, closes every other descriptor, sets the rlimits
# (argv[1:5]; no core files), reseeds `random` if imported, reads `<len> <wall_s> <s|m>\n<code>` from
# stdin byte-exactly (the rest stays in the pipe for the code), sets the CPU limit and the backstop
# alarm and runs the code as __main__, then exits the way an interpreter does (SystemExit codes,
# tracebacks, non-daemon threads joined, atexit, flush). When the job process exits, the zygote kills
# everything else in the namespace (kill(-1) from pid 1: leftover children, setsid daemons), reaps it
# all, empties the scratch directory (/tmp, a tmpfs) and restores its mode, and only then reports the
# job's exit status on the control socket (`<code> ok <notes>`): every writer of the job's pipes is
# dead by then, and the next job finds a namespace with nothing of this one in it. It also resets
# the scratch directory's timestamps and extended attributes, and compares its own state (every
# rlimit, nice, scheduling policy and priority, CPU affinity, the scratch directory's owner and
# xattrs: what a forked job inherits) with what it was at start. If the scratch directory cannot be
# emptied (say, nested deeper than the recursion limit), or its state changed, it reports
# `<code> retire <notes>` and exits; the parent starts a fresh sandbox for the slot, as it does when
# the zygote dies. Notes: `-`, or `seccomp` (a process it reaped was killed by the filter, SIGSYS)
# and `slot:<what changed>`, joined by `;`. Argv[6]
# is the scratch directory, argv[7] "ns" or "unsafe": without a pid namespace kill(-1) would reach the
# host, so unsafe mode kills the job's process group instead (the job's pid, `p<pid>`, is sent to the
# parent when it starts, for the same reason). `_socket`, `_signal`: no enum import.
ZYGOTE = r"""
import marshal, os, resource as R, sys, _signal, _socket
_signal.signal(_signal.SIGINT, _signal.SIG_IGN)
limits = list(map(int, sys.argv[1:5])) + [0]
[__import__(m) for m in sys.argv[5].split(",") if m]
scratch, isolated = sys.argv[6], sys.argv[7] == "ns"
scratch_mode = os.stat(scratch).st_mode & 0o7777
RLIMITS = sorted((n[7:].lower(), getattr(R, n)) for n in dir(R) if n.startswith("RLIMIT_"))

def xattrs(d):
    return {n: os.getxattr(d, n, follow_symlinks=False) for n in os.listxattr(d, follow_symlinks=False)}

def slot_state():
    st = os.stat(scratch)
    state = {n: R.getrlimit(r) for n, r in RLIMITS}
    state.update(nice=os.getpriority(os.PRIO_PROCESS, 0), policy=os.sched_getscheduler(0),
                 priority=os.sched_getparam(0).sched_priority, affinity=sorted(os.sched_getaffinity(0)),
                 scratch_owner=(st.st_uid, st.st_gid), scratch_xattrs=xattrs(scratch))
    return state

pristine = slot_state()
ctl = _socket.socket(fileno=os.dup(0))
nul = os.open("/dev/null", os.O_RDWR)
os.dup2(nul, 0)
os.close(nul)
sys.argv = sys.argv[:1]

def wipe(d):
    if os.stat(d).st_mode & 0o700 != 0o700:
        os.chmod(d, 0o700)
    for e in os.scandir(d):
        if e.is_dir(follow_symlinks=False):
            wipe(e.path)
            os.rmdir(e.path)
        else:
            os.unlink(e.path)

def reset_scratch():
    wipe(scratch)
    for name in set(os.listxattr(scratch)) - set(pristine["scratch_xattrs"]):
        os.removexattr(scratch, name)
    if os.stat(scratch).st_mode & 0o7777 != scratch_mode:
        os.chmod(scratch, scratch_mode)
    os.utime(scratch)  # the job's timestamps on it are gone too
    return not os.listdir(scratch)

def run_job(fds):
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    os.closerange(3, 1 << 16)
    if not isolated:
        os.setsid()
    for r, v in zip((R.RLIMIT_AS, R.RLIMIT_FSIZE, R.RLIMIT_NPROC, R.RLIMIT_NOFILE, R.RLIMIT_CORE), limits):
        R.setrlimit(r, (v, v))
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    if "random" in sys.modules:
        sys.modules["random"].seed()
    def read(n):
        b = b""
        while len(b) < n:
            c = os.read(0, n - len(b))
            if not c: os._exit(98)
            b += c
        return b
    h = b""
    while not h.endswith(b"\n"): h += read(1)
    n, wall, kind = h.decode().split()
    code = read(int(n))
    R.setrlimit(R.RLIMIT_CPU, (int(wall), int(wall)))
    _signal.alarm(int(wall) + 1)
    code = marshal.loads(code) if kind == "m" else compile(code, "<sandbox>", "exec")
    rc = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        rc = e.code if e.code is None or isinstance(e.code, int) else (print(e.code, file=sys.stderr), 1)[1]
    except BaseException:
        t, v, tb = sys.exc_info()
        sys.excepthook(t, v.with_traceback(tb.tb_next), tb.tb_next)  # from the code's frame on
        rc = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit((rc or 0) & 255)

while True:
    msg, anc, _, _ = ctl.recvmsg(4096, _socket.CMSG_SPACE(12), _socket.MSG_CMSG_CLOEXEC)
    if not msg:
        os._exit(0)
    fds = [fd for lvl, typ, data in anc if lvl == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS
           for fd in memoryview(data).cast("i")]
    if len(fds) != 3:
        os._exit(97)
    [__import__(m) for m in msg.decode().split(",") if m.isidentifier()]
    pid = os.fork()
    if pid == 0:
        try:
            ctl.detach()
            run_job(fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    ctl.send(b"p%d" % pid)
    status = os.waitpid(pid, 0)[1]
    statuses = [status]
    if isolated:
        while True:
            try: os.kill(-1, 9)
            except OSError: pass
            try: statuses.append(os.waitpid(-1, 0)[1])
            except ChildProcessError: break
    else:
        try: os.killpg(pid, 9)
        except OSError: pass
    notes = [b"seccomp"] if any(os.WIFSIGNALED(s) and os.WTERMSIG(s) == _signal.SIGSYS for s in statuses) else []
    try:
        clean = reset_scratch()
    except (OSError, RecursionError):
        clean = False
    now = slot_state()
    changed = [k for k in pristine if now[k] != pristine[k]]
    if changed:
        notes.append(b"slot:" + ",".join(changed).encode())
    ctl.send(b"%d %s %s" % (os.waitstatus_to_exitcode(status), b"ok" if clean and not changed else b"retire",
                            b";".join(notes) or b"-"))
    if not clean or changed:
        os._exit(96)
"""

BLOCKED_SYSCALLS = """ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp unshare setns mount umount2
pivot_root chroot move_mount open_tree fsopen fsmount fsconfig fspick mount_setattr kexec_load
kexec_file_load bpf keyctl add_key request_key personality perf_event_open init_module finit_module
delete_module reboot swapon swapoff acct quotactl syslog userfaultfd io_uring_setup io_uring_enter
io_uring_register shmget semget msgget mq_open open_by_handle_at name_to_handle_at settimeofday clock_settime clock_adjtime adjtimex
sethostname setdomainname iopl ioperm vhangup fanotify_init lookup_dcookie uselib""".split()
# Calls that change a process's inheritable state (resource limits, nice, scheduling policy and
# parameters, CPU affinity, I/O priority, memory placement). A job may aim them at itself (pid 0, or
# PRIO_PROCESS / IOPRIO_WHO_PROCESS with who 0) and so at the children it forks after; aimed at any
# other process, the zygote above all, whose state every later job of the slot inherits, they kill
# the caller (SIGSYS, which the zygote reports as "seccomp"): syscall -> (argument index, allowed value)
# pairs, each of which must hold.
SELF_ONLY = {
    "prlimit64": ((0, 0),), "sched_setaffinity": ((0, 0),), "sched_setscheduler": ((0, 0),),
    "sched_setparam": ((0, 0),), "sched_setattr": ((0, 0),), "migrate_pages": ((0, 0),), "move_pages": ((0, 0),),
    "setpriority": ((0, 0), (1, 0)),  # PRIO_PROCESS, who 0 (PRIO_PGRP and PRIO_USER reach the zygote)
    "ioprio_set": ((0, 1), (1, 0)),   # IOPRIO_WHO_PROCESS, who 0
}
OTHER_PROCESS = ("process_madvise", "process_mrelease")  # act on another process through a pidfd: killed
CLONE_NEW = (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)  # NS CGROUP UTS IPC USER PID NET
TIOCSTI = 0x5412
EPERM, ENOSYS = 1, 38


def seccomp_bpf() -> bytes:
    """The compiled filter, for bwrap's --seccomp. Foreign syscall ABIs (x32, i386) are killed."""
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError) as e:  # RuntimeError: libseccomp itself is missing
        raise IsolationError(f"seccomp unavailable ({e}): pip install pyseccomp and apt-get install -y "
                             f"libseccomp2, {UNSAFE_HINT}") from e
    f = sc.SyscallFilter(sc.ALLOW)
    for name in BLOCKED_SYSCALLS:
        try:
            f.add_rule(sc.ERRNO(EPERM), name)
        except Exception:  # a syscall this libseccomp or arch does not know: nothing to block
            log.debug("seccomp: no syscall %s here", name)
    for name, required in SELF_ONLY.items():
        for arg, value in required:  # rules of one syscall OR together: any unmet requirement kills
            f.add_rule(sc.KILL_PROCESS, name, sc.Arg(arg, sc.NE, value))
    for name in OTHER_PROCESS:
        try:
            f.add_rule(sc.KILL_PROCESS, name)
        except Exception:  # an older libseccomp: the syscall is unknown to it
            log.debug("seccomp: no syscall %s here", name)
    f.add_rule(sc.ERRNO(ENOSYS), "clone3")  # its flags are behind a pointer: libc falls back to clone
    for flag in CLONE_NEW:
        f.add_rule(sc.ERRNO(EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
    with tempfile.TemporaryFile() as t:
        f.export_bpf(t)
        t.seek(0)
        return t.read()


def world_readable(path: str) -> bool:
    """Can a uid in no group reach and run `path` (symlinks followed)? Our slot uids are such uids."""
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in p.parents) and os.stat(p).st_mode & 0o005 == 0o005


def pick_python(as_root: bool) -> str:
    """The sandbox's interpreter: ours, unless the slot uid cannot read it (pyenv under /root, 0700)."""
    if not as_root or world_readable(sys.executable):
        return sys.executable
    if os.path.exists("/usr/bin/python3") and world_readable("/usr/bin/python3"):
        return "/usr/bin/python3"
    raise IsolationError(f"no Python the sandbox uid can read: {sys.executable} is not world-readable; "
                         f"apt-get install -y python3, or pass python=/path/to/python3, {UNSAFE_HINT}")


def bwrap_args(python: str, tmpfs_mb: int) -> list[str]:
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--die-with-parent", "--new-session",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    # The interpreter's install (and venv) read-only, where it is not under /usr already.
    exe = os.path.realpath(python)
    prefixes = {sys.prefix, sys.base_prefix} if python == sys.executable else {str(Path(exe).parents[1])}
    args += [a for p in sorted(prefixes) if p != "/usr" and not p.startswith("/usr/") for a in ("--ro-bind", p, p)]
    # Three device nodes, not bwrap's --dev (eight bind mounts and a devpts: 1 ms a launch); /dev is
    # then a directory of the read-only root. Python's os.urandom uses getrandom(), not /dev.
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        args += ["--dev-bind", dev, dev]
    return args + ["--size", str(tmpfs_mb << 20), "--tmpfs", "/tmp",
                   "--remount-ro", "/", "--chdir", "/tmp"]


def find_bwrap(bwrap: str) -> str:
    found = shutil.which(bwrap)
    if not found:
        raise IsolationError(f"bubblewrap not found ({bwrap!r}): {FIX_BWRAP}, {UNSAFE_HINT}")
    return found


UID_LOCKS = Path("/run/posttrain-sandbox")  # one lock file per slot uid in use on this machine
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_DIR = "posttrain-sandbox"  # our slots' cgroups live under it, one named after each slot uid


def claim_uids(base: int, n: int, tries: int = 1 << 16) -> list[tuple[int, int]]:
    """`n` slot uids from `base` up that no other Sandbox on this machine holds, as (uid, lock fd).

    A uid is held by an flock on its file in UID_LOCKS for as long as the fd is open, so a trainer
    that dies releases its uids with it. Two sandboxes (two rewards, two ranks) never share a uid,
    and so never share what the kernel counts per uid (RLIMIT_NPROC) or a slot's cgroup."""
    try:
        UID_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise IsolationError(f"cannot create the sandbox uid locks in {UID_LOCKS} ({e}): make /run writable "
                             f"for root, {UNSAFE_HINT}") from e
    claimed: list[tuple[int, int]] = []
    for uid in range(base, base + tries):
        if len(claimed) == n:
            return claimed
        fd = os.open(UID_LOCKS / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claimed.append((uid, fd))
        except BlockingIOError:
            os.close(fd)
    for _, fd in claimed:
        os.close(fd)
    raise IsolationError(f"no {n} free sandbox uids from {base} on ({tries} tried; locks in {UID_LOCKS}): "
                         f"close other sandboxes, or pass another uid_base")


def slot_cgroup_dirs() -> list[Path]:
    """Every slot cgroup of ours on this machine (v2, or the v1 pids and memory hierarchies)."""
    tops = [CGROUP_ROOT / CGROUP_DIR, CGROUP_ROOT / "pids" / CGROUP_DIR, CGROUP_ROOT / "memory" / CGROUP_DIR]
    return sorted(d for top in tops if top.is_dir() for d in top.iterdir() if d.is_dir())


class SlotCgroup:
    """pids.max and a memory limit for one slot (cgroup v2, or the v1 pids + memory controllers),
    named after the slot's uid (which claim_uids holds for us alone), removed by `remove`."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs

    @staticmethod
    def create(uid: int, pids: int, memory_bytes: int) -> SlotCgroup | None:
        """None where we may not create one (not root, read-only cgroupfs): rlimits still hold."""
        name = f"uid{uid}"
        try:
            if (CGROUP_ROOT / "cgroup.controllers").exists():
                top = CGROUP_ROOT / CGROUP_DIR
                top.mkdir(exist_ok=True)
                for d in (CGROUP_ROOT, top):
                    (d / "cgroup.subtree_control").write_text("+pids +memory")
                limits = [(top / name, "pids.max", pids), (top / name, "memory.max", memory_bytes)]
            else:
                limits = [(CGROUP_ROOT / "pids" / CGROUP_DIR / name, "pids.max", pids),
                          (CGROUP_ROOT / "memory" / CGROUP_DIR / name, "memory.limit_in_bytes", memory_bytes)]
            for d, limit, value in limits:
                d.mkdir(parents=True, exist_ok=True)
                (d / limit).write_text(str(value))
            group = SlotCgroup(sorted({d for d, _, _ in limits}))
            group.kill_leftovers()  # a killed trainer's, if it held this uid: the uid's lock is ours now
            return group
        except OSError as e:
            log.info("sandbox: no per-slot cgroup (%s); RLIMIT_NPROC is the process limit", e)
            return None

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(found)

    def kill_leftovers(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def attach(self, pid: int | None) -> None:
        try:
            for d in self.dirs if pid else ():
                (d / "cgroup.procs").write_text(str(pid))
        except OSError as e:  # the process already died: its result will say so
            log.debug("sandbox: cgroup attach of %s failed: %s", pid, e)

    def remove(self, wait_s: float = 2.0) -> None:
        """rmdir the cgroup once the kernel has let its last process go (killed ones linger briefly)."""
        end = time.monotonic() + wait_s
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() > end:
                        log.warning("sandbox: cgroup %s not removed (%s); the next sandbox with its uid reuses it", d, e)
                        break
                    self.kill_leftovers()
                    time.sleep(0.01)
