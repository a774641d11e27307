"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class SpeedrunError(Exception):
    exit_code = 1


class UsageError(SpeedrunError):
    """Bad arguments or configuration."""

    exit_code = 2


class DataError(SpeedrunError):
    """A data file or download is missing, corrupt or unreachable."""
