"""ftkit: a small library behind readable fine-tuning recipes for encoder models."""

import sys

__version__ = "0.1.0"


class DataError(ValueError):
    """A problem the user can fix: bad input data, options, files or run directories. The message names
    the file and, where known, the line or row. Recipes and `ftkit` print it as one line; every other
    exception is a bug and keeps its traceback."""


def error_exit(err: Exception) -> int:
    """Print `error: <message>` as one line on stderr and return the exit status for `err`: its
    `exit_status` (3 for `ftkit.reliability.NonFiniteError`, training diverged), else 1."""
    print(f"error: {err}", file=sys.stderr)
    return getattr(err, "exit_status", 1)
