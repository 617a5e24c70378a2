"""The one exception family the command line turns into a one-line message."""

from __future__ import annotations


class S2sgwError(Exception):
    """An error whose message is fit for the user: printed as one line, no traceback."""
