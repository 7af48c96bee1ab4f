"""The one error type users see, and how the CLI prints it.

Anything a user can cause (a bad recipe, a missing file, a model that does not fit) is raised as
`LorafitError`; the CLI turns it into one line and exit code 1. Every other exception is a bug and
keeps its traceback (shown with `--debug`).
"""

from __future__ import annotations

EXIT_USER_ERROR = 1
EXIT_RUN_FAILED = 2
EXIT_INTERRUPTED = 130


class LorafitError(Exception):
    """A problem the user can fix: names where it is (`where`) and what to do (`hint`)."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class RunFailed(LorafitError):
    """The run started but could not finish (NaN loss, out of memory, disk full)."""

    exit_code = EXIT_RUN_FAILED


class Interrupted(LorafitError):
    """The user stopped the run; a checkpoint was written where possible."""

    exit_code = EXIT_INTERRUPTED


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type name when it has no message), cut so a one-line error stays one line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
