"""Suite-wide checks. After the whole suite, nothing of a code sandbox this suite started is left on
the machine: no slot-uid, bwrap or zygote process that is this process's or an orphan's (warm slots
included: every Sandbox was closed; battery.our_processes), and no process in the cgroup of a slot
uid that no live Sandbox holds."""
from __future__ import annotations

import fcntl
from pathlib import Path

import pytest


def _unheld_slot_cgroups() -> list[Path]:
    """The slot cgroups whose uid no live Sandbox holds (its lock file is free)."""
    from rewards.isolation import UID_LOCKS, slot_cgroup_dirs

    free = []
    for d in slot_cgroup_dirs():
        lock = UID_LOCKS / f"uid-{d.name[3:]}.lock"
        if not d.name.startswith("uid") or not lock.exists():
            free.append(d)
            continue
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free.append(d)
            except BlockingIOError:
                pass
    return free


@pytest.fixture(scope="session", autouse=True)
def no_sandbox_left_after_the_suite():
    yield
    from battery import our_processes  # tests/ is on sys.path; imported late: most runs never need it

    left = our_processes(include_warm=True)
    in_cgroups = {str(d): (d / "cgroup.procs").read_text().split() for d in _unheld_slot_cgroups()}
    assert left == [], f"sandbox processes left after the suite: {left}"
    assert not any(in_cgroups.values()), f"processes left in the slots' cgroups: {in_cgroups}"
