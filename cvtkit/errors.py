"""The project's own error types: a user's mistake, reported as one line without a traceback.

Entry points catch `CvtkitError` (and only it) and print `error: <message>`; anything else is a bug
in our code or a library and propagates with its traceback. Each subclass's message names the file,
key or value and what was expected.
"""
from __future__ import annotations


class CvtkitError(Exception):
    """Bad input: a config, a path, a checkpoint or data that cannot be used as asked.
    `exit_code` is what an entry point exits with: 2 for bad input, 1 for a run that failed on
    its data or numbers (damaged shards, a diverging loss, a full disk)."""

    exit_code = 2

    def one_line(self) -> str:
        """The message. Raised in a DataLoader worker, the error comes back with the worker's
        traceback folded into its message; its last line is the original one."""
        lines = [line for line in str(self).strip().splitlines() if line.strip()]
        if not lines:
            return type(self).__name__
        return lines[-1].split(f"{type(self).__name__}: ", 1)[-1]
