"""The sandbox's building blocks: bubblewrap arguments, the seccomp filter, the in-sandbox zygote that
forks each job and sets its rlimits, per-slot cgroups, and the checks that say what is missing.
rewards/sandbox.py runs them.

Each layer is here because an attack tried on this machine needed it (DESIGN.md section 9):
- bubblewrap with every namespace unshared: no network (a down loopback only), its own pid namespace
  (when its init dies the kernel kills everything inside, double-forked `setsid` daemons included),
  no /proc (nothing to read about other processes, no /proc/<pid>/mem), no nested user namespaces,
  environment cleared, /usr and the interpreter read-only, a size-capped tmpfs on /tmp the only
  writable place, /dev holding null, zero and urandom only, --die-with-parent, --new-session;
- seccomp (`seccomp_bpf`): ptrace, process_vm_*, pidfd_getfd, mount/unshare/setns and the namespace
  flags of clone, kexec, bpf, keyctl, perf, io_uring, modules, TIOCSTI... fail with EPERM;
- rlimits (`ZYGOTE`, before any untrusted byte runs): address space, CPU seconds, file size,
  processes, open files, no core files; and a wall-clock alarm as a backstop;
- a dedicated uid per slot when we are root (RLIMIT_NPROC does nothing for uid 0), dropped by
  setpriv so the spawn is a vfork (Popen(user=...) forks the whole trainer: 250 ms at 4 GB here);
- a per-slot cgroup (pids.max, memory) where root may create one.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
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
# job's exit status on the control socket (`<code> ok`): every writer of the job's pipes is dead by
# then, and the next job finds a namespace with nothing of this one in it. If the scratch directory
# cannot be emptied (say, nested deeper than the recursion limit) it reports `<code> retire` and
# exits; the parent starts a fresh sandbox for the slot, as it does when the zygote dies. Argv[6]
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
    if isolated:
        while True:
            try: os.kill(-1, 9)
            except OSError: pass
            try: os.waitpid(-1, 0)
            except ChildProcessError: break
    else:
        try: os.killpg(pid, 9)
        except OSError: pass
    try:
        wipe(scratch)
        if os.stat(scratch).st_mode & 0o7777 != scratch_mode:
            os.chmod(scratch, scratch_mode)
        clean = not os.listdir(scratch)
    except (OSError, RecursionError):
        clean = False
    ctl.send(b"%d %s" % (os.waitstatus_to_exitcode(status), b"ok" if clean else b"retire"))
    if not clean:
        os._exit(96)
"""

BLOCKED_SYSCALLS = """ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp unshare setns mount umount2
pivot_root chroot move_mount open_tree fsopen fsmount fsconfig fspick mount_setattr kexec_load
kexec_file_load bpf keyctl add_key request_key personality perf_event_open init_module finit_module
delete_module reboot swapon swapoff acct quotactl syslog userfaultfd io_uring_setup io_uring_enter
io_uring_register shmget semget msgget mq_open open_by_handle_at name_to_handle_at settimeofday clock_settime clock_adjtime adjtimex
sethostname setdomainname iopl ioperm vhangup fanotify_init lookup_dcookie uselib""".split()
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


class SlotCgroup:
    """pids.max and a memory limit for one slot (cgroup v2, or the v1 pids + memory controllers)."""

    def __init__(self, procs_files: list[Path]):
        self.procs_files = procs_files

    @staticmethod
    def create(name: str, pids: int, memory_bytes: int) -> SlotCgroup | None:
        """None where we may not create one (not root, read-only cgroupfs): rlimits still hold."""
        base = Path("/sys/fs/cgroup")
        try:
            if (base / "cgroup.controllers").exists():
                top = base / "posttrain-sandbox"
                top.mkdir(exist_ok=True)
                for d in (base, top):
                    (d / "cgroup.subtree_control").write_text("+pids +memory")
                (top / name).mkdir(exist_ok=True)
                (top / name / "pids.max").write_text(str(pids))
                (top / name / "memory.max").write_text(str(memory_bytes))
                return SlotCgroup([top / name / "cgroup.procs"])
            files = []
            for ctrl, limit, value in (("pids", "pids.max", pids), ("memory", "memory.limit_in_bytes", memory_bytes)):
                d = base / ctrl / "posttrain-sandbox" / name
                d.mkdir(parents=True, exist_ok=True)
                (d / limit).write_text(str(value))
                files.append(d / "cgroup.procs")
            return SlotCgroup(files)
        except OSError as e:
            log.info("sandbox: no per-slot cgroup (%s); RLIMIT_NPROC is the process limit", e)
            return None

    def attach(self, pid: int | None) -> None:
        try:
            for f in self.procs_files if pid else ():
                f.write_text(str(pid))
        except OSError as e:  # the process already died: its result will say so
            log.debug("sandbox: cgroup attach of %s failed: %s", pid, e)
