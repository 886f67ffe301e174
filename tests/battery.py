"""The escape battery's shared pieces (tests' helper): bounds, the `add` task, the process-table scan
that finds anything of a sandbox left running, and the per-test check that nothing is."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rewards.code import CodeReward
from rewards.isolation import UID_BASE

WALL_S = 2.0
CAP = 64 << 10
ADD = {"prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n",
       "entry_point": "add"}
ZYGOTE_MARK = "import marshal, os, resource as R"


def score(reward: CodeReward, completion: str, task: dict = ADD) -> float | None:
    return reward([""], [completion], **{k: [v] for k, v in task.items()})[0]


def our_processes(include_warm: bool = False) -> list[str]:
    """Sandbox processes (slot uids, bwrap, zygotes) that are this process's or orphans, except warm
    slots (bwrap children of this process and their idle init). Walking up through sandbox processes,
    the first other ancestor is us, init (an orphan: a leak) or gone; another live process's sandboxes
    (a trainer, a bench on the same machine) are its business, not this suite's."""
    procs, parents = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        uid, ppid = int(fields["Uid"].split()[0]), int(fields["PPid"])
        parents[int(pid)] = ppid
        if uid >= UID_BASE or ZYGOTE_MARK in cmd or "bwrap" in cmd.split(" ")[0]:
            procs[int(pid)] = (ppid, f"{pid} ppid={ppid} uid={uid} {fields['State']} {cmd[:80]}")

    def ours(pid: int) -> bool:
        while pid in procs:
            pid = parents.get(pid, 1)
        return pid in (os.getpid(), 1) or pid not in parents

    warm = {pid for pid, (ppid, _) in procs.items() if ppid == os.getpid()} if not include_warm else set()
    warm |= {pid for pid, (ppid, _) in procs.items() if ppid in warm}
    return [desc for pid, (_, desc) in procs.items() if pid not in warm and ours(pid)]


def wait_no_strays(seconds: float = 3.0) -> list[str]:
    end = time.monotonic() + seconds
    while (left := our_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def nothing_left_running():
    """Imported by each battery module: after every test, no sandbox process but the warm slots."""
    yield
    assert wait_no_strays() == []
