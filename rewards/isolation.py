"""The sandbox's building blocks: bubblewrap arguments, the seccomp filter, the in-sandbox prelude that
sets rlimits, per-slot cgroups, and the checks that say what is missing. rewards/sandbox.py runs them.

Each layer is here because an attack tried on this machine needed it (DESIGN.md section 9):
- bubblewrap with every namespace unshared: no network (a down loopback only), its own pid namespace
  (when its init dies the kernel kills everything inside, double-forked `setsid` daemons included),
  no /proc (nothing to read about other processes, no /proc/<pid>/mem), no nested user namespaces,
  environment cleared, /usr and the interpreter read-only, a size-capped tmpfs on /tmp the only
  writable place, /dev holding null, zero and urandom only, --die-with-parent, --new-session;
- seccomp (`seccomp_bpf`): ptrace, process_vm_*, pidfd_getfd, mount/unshare/setns and the namespace
  flags of clone, kexec, bpf, keyctl, perf, io_uring, modules, TIOCSTI... fail with EPERM;
- rlimits (`PRELUDE`, before any untrusted byte runs): address space, CPU seconds, file size,
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


# Runs first inside the sandbox (trusted). It sets the rlimits, imports the sandbox's preload modules
# (argv[5]), then blocks on stdin for the job: a warm slot sits here, started in advance. The job is
# `<len> <wall_s> <s|m> <modules>\n<code>`, read byte-exactly (unbuffered, so the rest of stdin stays
# in the pipe for the code). Then the job's modules are imported (stdlib that the code will import:
# forked children share them), the CPU limit and the backstop alarm are set, and the code runs, as
# source or as a code object marshalled by this same interpreter (Sandbox.compile). `_signal`, not
# `signal`: the latter imports enum, 4 ms.
PRELUDE = r"""
import marshal, os, resource as R, sys, _signal
for r, v in zip((R.RLIMIT_AS, R.RLIMIT_FSIZE, R.RLIMIT_NPROC, R.RLIMIT_NOFILE, R.RLIMIT_CORE),
                list(map(int, sys.argv[1:5])) + [0]):
    R.setrlimit(r, (v, v))
[__import__(m) for m in sys.argv[5].split(",") if m]
def _read(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c: os._exit(98)
        b += c
    return b
h = b""
while not h.endswith(b"\n"): h += _read(1)
n, wall, kind, mods = h.decode().split()
code = _read(int(n))
[__import__(m) for m in mods.split(",") if m != "-"]
R.setrlimit(R.RLIMIT_CPU, (int(wall), int(wall)))
_signal.alarm(int(wall) + 1)
code = marshal.loads(code) if kind == "m" else compile(code, "<sandbox>", "exec")
del _read, h, n, wall, kind, mods, r, v, R
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

BLOCKED_SYSCALLS = """ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp unshare setns mount umount2
pivot_root chroot move_mount open_tree fsopen fsmount fsconfig fspick mount_setattr kexec_load
kexec_file_load bpf keyctl add_key request_key personality perf_event_open init_module finit_module
delete_module reboot swapon swapoff acct quotactl syslog userfaultfd io_uring_setup io_uring_enter
io_uring_register open_by_handle_at name_to_handle_at settimeofday clock_settime clock_adjtime adjtimex
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
