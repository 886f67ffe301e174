"""`python -m posttrain.launch`: torchrun, with one line instead of its traceback when a rank fails.

    python -m posttrain.launch --nproc_per_node=2 train.py recipe=demo      # the same arguments as torchrun

When a rank exits with an error (train.py prints one `error: ...` line and exits 2), torchrun raises
ChildFailedError and Python prints a long traceback and failure summary after our line, exiting 1;
no torchrun option or error file turns that off. This runs torchrun's own entry point
(torch.distributed.run.main) and, on that exception, prints one line naming the first failed rank
and exits with that rank's status instead. Everything else (rendezvous, multi-node flags, restarts)
is torchrun's.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"posttrain.launch: {len(e.failures)} rank(s) failed; the first, rank {rank}, exited with status "
              f"{failure.exitcode} (its own message is above)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
