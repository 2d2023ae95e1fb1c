"""The exceptions the library raises for bad input and for a full disk."""


class FlapError(ValueError):
    """Raised for invalid configuration, model or data; the message says what to do instead."""

    exit_code = 2  # the CLI's exit status for it


class DiskFullError(FlapError):
    """A write ran out of disk space; nothing partial was left behind. The message says what was being written,
    how much space it needs and how much is free."""

    exit_code = 1
