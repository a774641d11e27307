"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""


class SpeedrunError(Exception):
    exit_code = 1


class UsageError(SpeedrunError):
    """Bad arguments or configuration."""

    exit_code = 2


class DataError(SpeedrunError):
    """A data file or download is missing, corrupt or unreachable."""
