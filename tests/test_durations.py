"""Durations for people: one parser for the CA's flags and the gateway's settings."""

from __future__ import annotations

import pytest

from s2sgw.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1h30m", 5400), ("90", 90), ("0.5s", 0.5), (" 2H ", 7200)],
)
def test_units_and_plain_seconds_are_read(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5m", "0s", "0", "5x", "m", "1.5.2h", "inf", "nan", "5 m"])
def test_anything_else_is_refused_with_the_forms_it_accepts(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_format_picks_the_largest_exact_unit() -> None:
    assert [format_duration(s) for s in (900, 86400, 90, 0.5)] == ["15m", "1d", "90s", "0.5s"]
