"""``s2sgw demo``: the whole architecture, running, in one command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """The demo subcommand is added here when it lands."""
