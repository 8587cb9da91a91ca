"""Small helpers without a home of their own."""

import datetime
import os
import re
import time

_DATED_FILE_PATTERN = re.compile(r"^(\d{4}-\d{2}-\d{2})\.")


def utc_date_string(timestamp: float) -> str:
    """The UTC date (YYYY-MM-DD) of a unix timestamp; names archive and log files."""
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).strftime("%Y-%m-%d")


def get_time_to_next_datapoint(
    seconds_between_datapoints: float, now: float | None = None
) -> float:
    """Seconds until the next multiple of the interval since the epoch, so that
    data points of every station line up in time. Called by procedures."""
    now = time.time() if now is None else now
    return float(seconds_between_datapoints - (now % seconds_between_datapoints))


def capped_exponential_delay(attempt: int, first: float, cap: float) -> float:
    """`first * 2**(attempt-1)`, at most `cap`; attempt 0 means no delay. Used by
    the main loop and the backends for restart and reconnect backoff."""
    if attempt <= 0:
        return 0.0
    return min(cap, first * 2.0 ** min(attempt - 1, 32))


def delete_expired_dated_files(
    directory: str, retention_days: int, now: float | None = None
) -> list[str]:
    """Delete files named `YYYY-MM-DD.*` whose date is more than `retention_days`
    before today (UTC); return their names. Called by the main loop."""
    if not os.path.isdir(directory):
        return []
    today = datetime.date.fromisoformat(utc_date_string(time.time() if now is None else now))
    oldest_kept = today - datetime.timedelta(days=retention_days)
    deleted: list[str] = []
    for name in sorted(os.listdir(directory)):
        match = _DATED_FILE_PATTERN.match(name)
        if match is None:
            continue
        try:
            file_date = datetime.date.fromisoformat(match.group(1))
        except ValueError:
            continue
        if file_date < oldest_kept:
            os.remove(os.path.join(directory, name))
            deleted.append(name)
    return deleted
