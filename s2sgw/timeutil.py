"""Reactor seconds to aware UTC datetimes: the one conversion every clock-driven module needs."""

from __future__ import annotations

import datetime

UTC = datetime.UTC


def utc(seconds: float) -> datetime.datetime:
    """The moment ``seconds`` after the epoch, as an aware UTC datetime."""
    return datetime.datetime.fromtimestamp(seconds, UTC)
