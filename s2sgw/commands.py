"""Gateway commands: ``check-config`` (and later ``explain``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Gateway subcommands are added here as they land."""
