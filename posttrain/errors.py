"""One exception type for mistakes a user can fix (bad path, bad config, bad file).

Command-line entry points catch `UserError` and print its message alone, without a
traceback; library callers get an ordinary exception (a ValueError) to handle.
Messages name the file, key or row, the rule that was broken and the fix.
"""


class UserError(ValueError):
    """A problem with the user's input, explained in the message. No traceback needed."""
