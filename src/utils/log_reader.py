"""Read Ivy's daily log files (`logs/YYYY-MM-DD.log`) as entries, filtered by
time, level and origin, the way `journalctl --since --until -p` does; and time
arguments as operators type them. Called by `ivy logs` and `ivy messages`."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from src import constants

from .functions import dated_files_between

_HEADER = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC - (.+?) - "
    r"(DEBUG|INFO|WARNING|ERROR|EXCEPTION) - "
)
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|min|m|h|d|w)(?:\s+ago)?$")
_UNIT_SECONDS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


class TimeArgumentError(ValueError):
    """A --since/--until value that is neither a time nor a duration."""


def parse_time_argument(text: str, now: float | None = None) -> float:
    """Unix time of `2026-11-23`, `2026-11-23 04:00[:00]`, `2026-11-23T04:00Z`
    (UTC unless an offset is given), `now`, `today`, `yesterday`, or a
    duration ago such as `30min`, `2h`, `3d`."""
    now = time.time() if now is None else now
    value = text.strip().lower()
    today = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    if value == "now":
        return now
    if value == "today":
        return today.timestamp()
    if value == "yesterday":
        return (today - datetime.timedelta(days=1)).timestamp()
    match = _RELATIVE.match(value)
    if match:
        return now - float(match[1]) * _UNIT_SECONDS[match[2]]
    try:
        parsed = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise TimeArgumentError(
            f"{text!r} is not a time (2026-11-23 04:00, UTC) or a duration ago (30min, 2h, 3d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


@dataclass(frozen=True)
class LogEntry:
    """One log line with its indented detail lines."""

    timestamp: float
    origin: str
    level: str
    text: str


def parse_entries(lines: Iterable[str]) -> Iterator[LogEntry]:
    """Entries of log lines: a header line and the indented lines after it.
    Lines before the first header (a torn write) are skipped."""
    header: re.Match[str] | None = None
    collected: list[str] = []
    for line in lines:
        match = _HEADER.match(line)
        if match is None:
            if header is not None:
                collected.append(line)
            continue
        if header is not None:
            yield _entry(header, collected)
        header, collected = match, [line]
    if header is not None:
        yield _entry(header, collected)


def _entries_of_file(path: str) -> Iterator[LogEntry]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from parse_entries(f)


def _entry(header: re.Match[str], lines: list[str]) -> LogEntry:
    stamp = datetime.datetime.strptime(header[1], "%Y-%m-%d %H:%M:%S.%f")
    return LogEntry(
        timestamp=stamp.replace(tzinfo=datetime.timezone.utc).timestamp(),
        origin=header[2],
        level=header[3],
        text="".join(lines).rstrip("\n"),
    )


def log_files(since: float | None = None, until: float | None = None) -> list[str]:
    """The daily log files whose date can hold entries in [since, until]."""
    return dated_files_between(constants.LOGS_DIR, ".log", since, until)


def read_entries(
    since: float | None = None,
    until: float | None = None,
    min_level: str | None = None,
    origin: str | None = None,
) -> Iterator[LogEntry]:
    """Every entry in time order that is in [since, until], at least
    `min_level` and from `origin` (an exact name, or a prefix ending in `*`),
    streamed file by file."""
    for path in log_files(since, until):
        for entry in _entries_of_file(path):
            if since is not None and entry.timestamp < since:
                continue
            if until is not None and entry.timestamp > until:
                continue
            if entry_matches(entry, min_level, origin):
                yield entry


def entry_matches(entry: LogEntry, min_level: str | None, origin: str | None) -> bool:
    """Whether an entry is at least `min_level` and from `origin` (an exact
    name, or a prefix ending in `*`)."""
    if min_level and (
        constants.LOGGING_LEVEL_PRIORITIES[entry.level]
        < constants.LOGGING_LEVEL_PRIORITIES[min_level]
    ):
        return False
    if origin is None:
        return True
    if origin.endswith("*"):
        return entry.origin.startswith(origin[:-1])
    return entry.origin == origin
