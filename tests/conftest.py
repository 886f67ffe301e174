"""Suite-wide checks. After the whole suite, nothing of a code sandbox is left on the machine: no
process of a slot uid, no bwrap or zygote (warm slots included: every Sandbox was closed), and no
process in any slot's cgroup."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def no_sandbox_left_after_the_suite():
    yield
    from battery import our_processes  # tests/ is on sys.path; imported late: most runs never need it

    from rewards.isolation import slot_cgroup_dirs

    left = our_processes(include_warm=True)
    in_cgroups = {str(d): (d / "cgroup.procs").read_text().split() for d in slot_cgroup_dirs()}
    assert left == [], f"sandbox processes left after the suite: {left}"
    assert not any(in_cgroups.values()), f"processes left in the slots' cgroups: {in_cgroups}"
