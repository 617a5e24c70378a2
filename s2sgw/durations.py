"""Durations written for people: ``60s``, ``15m``, ``24h``, ``7d``, ``1h30m`` or plain seconds.

One parser for every flag and setting that takes a lifetime or a time-to-live, so ``15m`` means
the same thing on the CA and on the gateway.
"""

from __future__ import annotations

import math
import re

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+\Z")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ValueError naming the accepted forms when it is not a positive duration."""
    cleaned = text.strip().lower()
    try:
        seconds = float(cleaned)
    except ValueError:
        if not _WHOLE.match(cleaned):
            raise ValueError(
                f"invalid duration {text!r}: use a number with a unit such as 60s, 15m, 24h or 7d"
            ) from None
        seconds = sum(float(number) * UNITS[unit] for number, unit in _PART.findall(cleaned))
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: it must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact form of ``seconds`` in one unit (``900`` -> ``15m``), for messages."""
    for unit in ("d", "h", "m"):
        count = seconds / UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"
