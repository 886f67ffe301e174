"""The escape battery, part 1: what a job can see and touch, its processes, its resources, and the
refusals without isolation. Every attack contained, nothing left running, nothing changed on the
host. Each attack is bounded: 2 s wall, 256 MB, 64 KB of output; the network is a 127.0.0.1
listener this module starts. Raw attacks go through `Sandbox` (the code prints what it managed; we
check the host too). Part 2, what a job leaves for the next one: test_sandbox_slots.py; part 3,
attacks on the verdict through `CodeReward`: test_sandbox_verdict.py.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from battery import CAP, WALL_S, nothing_left_running, our_processes, score, wait_no_strays  # noqa: F401

from rewards.code import CodeReward
from rewards.isolation import UID_BASE, IsolationError
from rewards.sandbox import Job, Sandbox

SECRET = secrets.token_hex(16)
os.environ["POSTTRAIN_SANDBOX_TEST_SECRET"] = SECRET  # before any sandbox is started


@pytest.fixture(scope="module")
def box():
    b = Sandbox(timeout_s=WALL_S, memory_mb=256, max_output_bytes=CAP, workers=2)
    yield b
    b.close()


@pytest.fixture(scope="module")
def reward():
    r = CodeReward(timeout_s=WALL_S, memory_mb=256, max_output_bytes=CAP, workers=2)
    yield r
    r.close()


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    """A world-readable host directory with a secret file: nothing inside a sandbox may see it."""
    d = tmp_path_factory.mktemp("host")
    d.chmod(0o755)
    (d / "secret.txt").write_text(SECRET)
    (d / "secret.txt").chmod(0o644)
    return d


# --- what the code can see and touch --------------------------------------------------------------

def test_environment_secret_is_not_visible(box):
    res = box.run("import os; print(dict(os.environ))")
    assert res.exit_code == 0, res.stderr
    assert SECRET.encode() not in res.stdout + res.stderr
    assert b"POSTTRAIN" not in res.stdout


def test_proc_1_environ_is_not_readable(box):
    code = """
for path in ("/proc/1/environ", "/proc/self/environ", "/proc/self/mem", "/proc/1/cmdline"):
    try:
        print(path, open(path, "rb").read()[:100])
    except OSError as e:
        print(path, type(e).__name__)
"""
    res = box.run(code)
    assert SECRET.encode() not in res.stdout + res.stderr
    assert res.stdout.count(b"FileNotFoundError") == 4, res.stdout  # no /proc in the sandbox at all


def test_host_files_cannot_be_read(box, host_dir):
    code = f"""
import os
for path in ({str(host_dir / "secret.txt")!r}, "/etc/passwd", "/etc/shadow", "/root", "/work", {os.getcwd()!r}):
    try:
        print(path, open(path).read()[:50] if os.path.isfile(path) else os.listdir(path))
    except OSError as e:
        print(path, type(e).__name__)
"""
    res = box.run(code)
    assert SECRET.encode() not in res.stdout + res.stderr
    assert res.stdout.count(b"FileNotFoundError") == 6, res.stdout


def test_host_files_cannot_be_written(box, host_dir):
    before = sorted(p.name for p in host_dir.iterdir())
    marker = f"posttrain-sandbox-{secrets.token_hex(4)}"
    code = f"""
for path in ({str(host_dir / "new.txt")!r}, {str(host_dir / "secret.txt")!r}, "/usr/{marker}", "/{marker}",
             "/etc/{marker}", "/dev/{marker}", "/tmp/{marker}"):
    try:
        with open(path, "w") as f:
            f.write("owned")
        print(path, "written")
    except OSError as e:
        print(path, type(e).__name__)
"""
    res = box.run(code)
    lines = res.stdout.decode().splitlines()
    assert lines[-1].endswith("written"), lines  # /tmp: the sandbox's own tmpfs, gone with it
    assert all(not line.endswith("written") for line in lines[:-1]), lines
    assert sorted(p.name for p in host_dir.iterdir()) == before
    assert (host_dir / "secret.txt").read_text() == SECRET
    assert not any(Path(p, marker).exists() for p in ("/usr", "/", "/etc", "/dev", "/tmp"))


def test_host_file_cannot_be_deleted(box, host_dir):
    # One file where the sandbox has no view, one where it has a read-only one (/usr).
    under_usr = Path(f"/usr/local/share/posttrain-sandbox-test-{secrets.token_hex(4)}")
    under_usr.parent.mkdir(parents=True, exist_ok=True)
    under_usr.write_text("keep me")
    under_usr.chmod(0o666)
    try:
        code = f"""
import os, shutil
for path in ({str(host_dir / "secret.txt")!r}, {str(under_usr)!r}):
    try:
        os.remove(path)
        print(path, "deleted")
    except OSError as e:
        print(path, type(e).__name__)
try:
    shutil.rmtree("/usr/local/share")
except OSError as e:
    print("rmtree", type(e).__name__)
"""
        res = box.run(code)
        assert b"deleted" not in res.stdout, res.stdout
        assert (host_dir / "secret.txt").read_text() == SECRET
        assert under_usr.read_text() == "keep me"
    finally:
        under_usr.unlink()


def test_cannot_connect_to_a_host_listener(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"""
import socket
for host in ("127.0.0.1", "localhost", "::1"):
    try:
        socket.create_connection((host, {port}), timeout=1).sendall(b"leak")
        print(host, "connected")
    except OSError as e:
        print(host, type(e).__name__)
try:
    socket.getaddrinfo("pypi.org", 443)
    print("dns resolved")
except OSError as e:
    print("dns", type(e).__name__)
"""
    try:
        res = box.run(code)
        assert b"connected" not in res.stdout and b"resolved" not in res.stdout, res.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


# --- processes ------------------------------------------------------------------------------------

def test_fork_bomb_is_bounded(box):
    code = """
import os, time
n = 0
for _ in range(10_000):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    except OSError as e:
        print("refused:", e.strerror)
        break
print("forks", n)
"""
    res = box.run(code)
    out = res.stdout.decode()
    assert "refused: Resource temporarily unavailable" in out, out
    assert int(out.split("forks")[1]) < box.max_procs  # RLIMIT_NPROC (and the slot's pids.max)
    assert res.wall_s < WALL_S  # the sleepers die with the namespace, not at the deadline


def test_double_forked_setsid_daemon_does_not_outlive_the_run(box):
    code = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for _ in range(600):
            time.sleep(0.1)
        os._exit(0)
    os._exit(0)
print("parent done")
"""
    res = box.run(code)
    assert res.stdout == b"parent done\n" and res.exit_code == 0
    assert wait_no_strays() == []


def test_killing_the_parent(box, reward):
    code = f"""
import os, signal
for target in (os.getppid(), 1, -1, 0, {os.getpid()}):
    try:
        os.kill(target, signal.SIGKILL)
        print(target, "sent")
    except OSError as e:
        print(target, type(e).__name__)
print("still here")
"""
    res = box.run(code)
    # getppid() and 1 are the zygote, pid 1 of the namespace, which the kernel protects from its own
    # namespace; -1 reaches nothing else; 0, its own process group, kills the code itself.
    assert res.stdout == b"", res.stdout  # dead at kill(0) before its (block-buffered) prints were flushed
    assert res.exit_code == -9 and res.killed_reason is None  # the zygote survived to report it
    assert box.run("print('next')").stdout == b"next\n"  # and the slot still serves jobs
    # Inside the code reward the candidate can kill its harness (same uid, no pid-1 protection): the
    # report then stops short, and the sample fails closed, whatever the function returns.
    kill = (f"    import os, signal\n"
            f"    for t in (os.getppid(), 1, -1, {os.getpid()}):\n"
            f"        try:\n            os.kill(t, signal.SIGKILL)\n        except OSError:\n            pass\n")
    assert score(reward, kill + "    return a + b\n") == 0.0
    assert score(reward, kill + "    return a * b\n") == 0.0
    assert score(reward, "    import os\n    os.killpg(0, 9)\n    return a + b\n") == 0.0  # kills itself
    assert reward.last_metrics["errors"] == 0
    assert score(reward, "    return a + b\n") == 1.0  # the same sandboxes go on giving right verdicts


# --- resources ------------------------------------------------------------------------------------

def test_infinite_output_is_capped(box):
    res = box.run("while True:\n    print('x' * 1000)")
    assert res.killed_reason == "output_cap" and len(res.stdout) == CAP
    assert res.wall_s < WALL_S


def test_2gb_allocation_fails(box):
    res = box.run("try:\n    b = bytearray(2 << 30)\n    print('allocated')\nexcept MemoryError:\n    print('MemoryError')")
    assert res.stdout == b"MemoryError\n", res


def test_cpu_spin_is_killed_at_the_wall_clock(box):
    res = box.run("while True:\n    pass")
    assert res.timed_out and res.killed_reason == "timeout"
    assert WALL_S <= res.wall_s < WALL_S + 1.5


def test_sleeping_forever_is_killed_at_the_wall_clock(box):
    res = box.run("import time\ntime.sleep(10 ** 6)")
    assert res.timed_out and WALL_S <= res.wall_s < WALL_S + 1.5


def test_100mb_file_is_refused(box):
    code = """
try:
    with open("/tmp/big", "wb") as f:
        for _ in range(100):
            f.write(b"x" * (1 << 20))
    print("wrote 100 MB")
except OSError as e:
    print(e.strerror)
"""
    res = box.run(code)
    assert res.stdout == b"File too large\n", res


def test_posix_system_stays_inside(box, host_dir):
    target = host_dir / "pwned"
    res = box.run(f"import posix\nprint(posix.system('id -u; touch {target}; ls /root; echo done'))")
    out = res.stdout.decode()
    assert int(out.split()[0]) >= UID_BASE or os.geteuid() != 0, out  # a slot uid, never root
    assert "done" in out and not target.exists()


def test_unshare_mount_and_ptrace_are_refused(box):
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def show(name, rc):
    print(name, rc, os.strerror(ctypes.get_errno()) if rc == -1 else "")
for flag in (0x10000000, 0x20000, 0x40000000, 0x20000000):  # user, mount, net, pid
    show(f"unshare {flag:#x}", libc.unshare(flag))
show("setns", libc.setns(0, 0))
show("mount", libc.mount(b"none", b"/usr", b"tmpfs", 0, None))
show("ptrace traceme", libc.ptrace(0, 0, 0, 0))
show("ptrace attach 1", libc.ptrace(16, 1, 0, 0))
"""
    res = box.run(code)
    lines = res.stdout.decode().splitlines()
    assert len(lines) == 8, res
    assert all(" -1 " in line and ("Operation not permitted" in line or "Bad file" in line) for line in lines), lines


# --- refusing to run without isolation ------------------------------------------------------------

def test_refuses_without_bubblewrap():
    with pytest.raises(IsolationError, match=r"apt-get install -y bubblewrap.*unsafe=True"):
        Sandbox(bwrap="/nonexistent/bwrap")
    with pytest.raises(IsolationError, match="bubblewrap not found"):
        CodeReward(bwrap="/nonexistent/bwrap")


def test_refuses_without_user_namespaces():
    # A bwrap that fails as it does where user namespaces are off (it must be runnable by a slot uid).
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        fake = Path(d, "bwrap")
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        with pytest.raises(IsolationError, match=r"No permissions.*user namespaces.*unsafe=True"):
            Sandbox(bwrap=str(fake))


def test_refuses_without_seccomp(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import now raises ImportError
    with pytest.raises(IsolationError, match="pip install pyseccomp"):
        Sandbox()


def test_unsafe_mode_warns_on_every_run(caplog):
    r = CodeReward(timeout_s=WALL_S, unsafe=True, workers=1)
    try:
        with caplog.at_level(logging.WARNING, logger="rewards.sandbox"):
            assert score(r, "    return a + b\n") == 1.0
            assert score(r, "    return a - b\n") == 0.0
        warnings = [rec for rec in caplog.records if "UNSAFE" in rec.getMessage()]
        assert len(warnings) == 2
        box = r.sandbox  # unsafe mode reuses its zygote too; a timed-out job takes it down
        assert box.run("while True: pass", wall_s=0.5).killed_reason == "timeout"
        assert box.run("import os; open('f', 'w'); print(os.listdir('.'))").stdout == b"['f']\n"
        assert box.run("import os; print(os.listdir('.'))").stdout == b"[]\n"  # its scratch emptied
    finally:
        r.close()


def test_nothing_left_after_close():
    base = UID_BASE + 1000  # uids of its own, to tell its processes from the module's warm slots
    b = Sandbox(timeout_s=WALL_S, workers=2, uid_base=base)
    b.map([Job("import time; time.sleep(10)", wall_s=0.5), Job("print(1)")])
    b.close()
    assert wait_no_strays() == []
    if os.geteuid() == 0:  # not even its warm slots: no process of its uids at all
        assert [p for p in our_processes(include_warm=True) if f"uid={base}" in p or f"uid={base + 1} " in p] == []
