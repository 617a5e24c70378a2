"""``s2sgw ca ...``: init, issue, revoke, crl, list."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """CA subcommands are added here as they land."""
