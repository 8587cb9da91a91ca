"""Durations as operators type them on the command line."""

from __future__ import annotations

_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """`30min`, `12h`, `7d`, `90s` -> seconds; ValueError naming the value
    for anything else (zero and negative durations included)."""
    for unit in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(unit):
            try:
                number = float(value[: -len(unit)])
            except ValueError:
                break
            if number > 0:
                return number * _UNITS[unit]
    raise ValueError(f"{value!r} is not a duration such as 90s, 30min, 12h or 7d")
