"""The exceptions train.py turns into one line and an exit status, without a traceback.

`UserError`: mistakes a user can fix (bad path, bad config, bad file), exit 2.
`Preempted`: a stage stopped on SIGTERM after writing its checkpoint, exit 0 (a scheduler's
preemption; `resume=true` continues exactly). Library code raises it, never SystemExit.

Command-line entry points catch `UserError` and print its message alone, without a
traceback; library callers get an ordinary exception (a ValueError) to handle.
Messages name the file, key or row, the rule that was broken and the fix.
"""


class UserError(ValueError):
    """A problem with the user's input, explained in the message. No traceback needed."""


class Preempted(Exception):
    """A stage got SIGTERM, finished its step and saved a checkpoint; the message says where."""
