"""Reward throughput: sandboxed code executions vs plain subprocesses, side by side in one run; math checks.

    python bench/rewards.py [--repeats 5] [--workers 2] [--programs 164]

The programs are HumanEval's canonical solutions with their tests (prompt + solution + test +
`check(entry_point)`), the work a code reward does. Every row runs the same programs with the
same number of parallel workers, and the table gives executions per second (median over repeats):
- `subprocess.run([sys.executable, prog.py])`: the plain baseline, site imports included;
- the same with the sandbox's own interpreter and flags (`python -I -S`): the strict baseline;
- `Sandbox.map`: each program in a fresh process forked by the slot's zygote, inside the slot's
  sandbox (bubblewrap, seccomp, rlimits, slot uid), which is emptied after each program;
- `CodeReward`: the full reward, harness and verdict protocol included (two processes per sample).
Ratios are against the strict baseline; rounds are interleaved so a shared machine's load drifts over
all rows alike, and CPU ms per run is given as a load-independent figure: this process's own CPU (the
threads that spawn, feed and read) plus its reaped children's plus the sandboxes' zygotes and jobs.
Math: `rewards.get("math")` on \\boxed answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: rewards/, data/

from data.humaneval import columns, load_humaneval  # noqa: E402
from rewards.code import CodeReward  # noqa: E402
from rewards.sandbox import Job, Sandbox  # noqa: E402


def interleaved(contenders: dict, n: int, repeats: int, cpu) -> dict[str, tuple[float, float]]:
    """name -> (runs/s, CPU ms per run), medians over `repeats` rounds. Each round runs every contender
    once, in turn, so the load of a shared machine drifts over all of them alike. `cpu()` is the CPU
    seconds used so far by everything involved: a measure the machine's load does not inflate."""
    for fn in contenders.values():
        fn()  # warm-up: page cache, first compile, thread start, warm slots
    walls: dict[str, list[float]] = {k: [] for k in contenders}
    cpus: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            c0, t0 = cpu(), time.perf_counter()
            fn()
            c1 = cpu()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(c1 - c0)
    return {k: (n / statistics.median(walls[k]), 1000 * statistics.median(cpus[k]) / n) for k in contenders}


def plain(argv_prefix: list[str], paths: list[str], workers: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda p: subprocess.run([*argv_prefix, p], capture_output=True, timeout=60), paths))
    failed = [r for r in done if r.returncode != 0]
    assert not failed, f"{len(failed)} plain runs failed: {failed[0].stderr[-500:]!r}"


def math_checks(repeats: int, n: int = 100) -> str:
    """Checks per second of `rewards.get("math")`: fresh problems every round (the reward may cache),
    answers that need Math-Verify (a LaTeX fraction against `a/b`), not a string match."""
    try:
        import rewards
        math_reward = rewards.get("math")
    except Exception as e:  # noqa: BLE001 - the registry or math-verify may be missing: say so
        return f"math reward not available ({type(e).__name__}: {e})"

    def batch(r: int) -> tuple[list[str], list[str]]:
        nums = range(r * n + 1, (r + 1) * n + 1)
        return ([f"So the answer is \\boxed{{\\frac{{{i}}}{{{i + 1}}}}}" for i in nums], [f"{i}/{i + 1}" for i in nums])

    times = []
    try:
        for r in range(repeats + 1):  # round 0 warms the worker processes up
            completions, answers = batch(r)
            t0 = time.perf_counter()
            scores = math_reward(["Compute it."] * n, completions, answer=answers)
            times.append(time.perf_counter() - t0)
            assert all(s == 1.0 for s in scores), f"math reward disagreed: {scores[:5]}"
    finally:
        getattr(math_reward, "close", lambda: None)()
    return (f"math checks/s: {n / statistics.median(times[1:]):.0f} ({n} fresh \\frac-vs-a/b answers per call, "
            f"median of {repeats}; first call {times[0]:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--programs", type=int, default=164)
    args = ap.parse_args()

    rows = load_humaneval(limit=args.programs)
    programs = [r["prompt"] + r["canonical_solution"] + "\n" + r["test"] + f"\ncheck({r['entry_point']})\n"
                for r in rows]
    box = Sandbox(timeout_s=20, memory_mb=512, workers=args.workers)
    reward = CodeReward(timeout_s=20, memory_mb=512, workers=args.workers)
    cols = columns(rows)
    n = len(programs)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, prog in enumerate(programs):
            paths.append(os.path.join(tmp, f"p{i}.py"))
            Path(paths[-1]).write_text(prog)
        jobs = [Job(p) for p in programs]

        def sandboxed() -> None:
            bad = [r for r in box.map(jobs) if r.exit_code != 0]
            assert not bad, f"{len(bad)} sandboxed runs failed: {bad[0].stderr[-500:]!r}"

        def rewarded() -> None:
            scores = reward(cols["prompt"], cols["canonical_solution"], **cols)
            assert all(s == 1.0 for s in scores), f"canonical solutions failed: {reward.last_metrics}"

        def cpu() -> float:
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system + box.cpu_seconds() + reward.sandbox.cpu_seconds()

        results = interleaved({
            "subprocess.run([sys.executable, prog])": lambda: plain([sys.executable], paths, args.workers),
            f"subprocess.run([{box.python}, -I, -S, prog])": lambda: plain([box.python, "-I", "-S"], paths, args.workers),
            "Sandbox.map (a fresh process per program)": sandboxed,
            "CodeReward (sandbox + harness + verdict)": rewarded,
        }, n, args.repeats, cpu)
    strict = list(results.values())[1][0]
    print(f"{n} HumanEval programs, {args.workers} workers, {os.cpu_count()} cores, median of {args.repeats} "
          f"interleaved rounds; load average {os.getloadavg()[0]:.1f}; sandbox python {box.python}, "
          f"{'root: one uid per slot' if box.as_root else 'not root'}")
    print(f"{'':48s} {'runs/s':>8s} {'vs strict':>10s} {'CPU ms/run':>11s}")
    for name, (rate, cpu_ms) in results.items():
        print(f"{name:48s} {rate:8.1f} {rate / strict:9.2f}x {cpu_ms:11.1f}")
    print(math_checks(args.repeats))
    box.close()
    reward.close()


if __name__ == "__main__":
    main()
