"""The one exception family the command line turns into a one-line message."""

from __future__ import annotations


class S2sgwError(Exception):
    """An error whose message is fit for the user: printed as one line, no traceback."""


class StartupError(SystemExit, Exception):
    """A service that cannot start (a port in use): the process exits with this one line.

    An ``Exception``, so a daemonizing twistd reports it to the waiting parent and removes its
    pid file; a ``SystemExit``, so when twistd re-raises it Python prints the message alone, with
    no traceback, and exits with status 1.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"s2sgw: {message}")


def listen_problem(what: str, key: str, listen: str, error: str) -> str:
    """One line naming what could not listen, the configuration key and the address."""
    return f"{what} cannot listen ({key} = {listen!r}): {error}"
