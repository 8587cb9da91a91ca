"""Small helpers without a home of their own."""

import contextlib
import datetime
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from src import constants
from src.types import LogLevel

from .file_lock import single_instance_lock

_DATED_FILE_PATTERN = re.compile(r"^(\d{4}-\d{2}-\d{2})\.")


def utc_date_string(timestamp: float) -> str:
    """The UTC date (YYYY-MM-DD) of a unix timestamp; names archive and log files."""
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).strftime("%Y-%m-%d")


def current_log_file_path(now: float | None = None) -> str:
    """`logs/YYYY-MM-DD.log` for the UTC day of `now` (default: now). Called by
    the logger, `ivy logs` and tests."""
    day = utc_date_string(time.time() if now is None else now)
    return os.path.join(constants.LOGS_DIR, f"{day}.log")


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


def dated_files_between(
    directory: str, suffix: str, since: float | None, until: float | None
) -> list[str]:
    """Paths of the files `YYYY-MM-DD<suffix>` in `directory` whose UTC date
    can hold times in [since, until] (None: open), oldest first. Called by
    the log and archive readers."""
    if not os.path.isdir(directory):
        return []
    first = utc_date_string(since) if since is not None else ""
    last = utc_date_string(until) if until is not None else "9999-99-99"
    return [
        os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if name.endswith(suffix)
        and _DATED_FILE_PATTERN.match(name)
        and name[: -len(suffix)] == name[:10]
        and first <= name[:10] <= last
    ]


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


def log_level_is_visible(min_log_level: LogLevel | None, log_level: LogLevel) -> bool:
    """Whether a line at `log_level` passes a channel set to `min_log_level`
    (None: the channel is off). Called by the logger."""
    return min_log_level is not None and (
        constants.LOGGING_LEVEL_PRIORITIES[log_level]
        >= constants.LOGGING_LEVEL_PRIORITIES[min_log_level]
    )


@contextlib.contextmanager
def with_automation_lock() -> Iterator[None]:
    """Hold the single-instance lock of this installation (`data/ivy.lock`)
    for the block; raise TimeoutError at once when it is held, by another
    instance or by this very process (entering it twice raises, as in Ivy 1.1).
    The main loop's children inherit it, so while any process of Ivy lives the
    lock is taken. Called by run.py (and by tests that must not run beside a
    station)."""
    os.makedirs(os.path.dirname(constants.MAINLOOP_LOCK_PATH), exist_ok=True)
    with single_instance_lock(constants.MAINLOOP_LOCK_PATH):
        yield


def publish_mqtt_message(
    topic: str,
    message: dict[Any, Any],
    host: str,
    port: int,
    username: str,
    password: str,
    sleep: float,
) -> None:
    """Publish one JSON message with QoS 1, wait for its PUBACK, then wait
    `sleep` seconds. For operators and tests that poke a broker by hand; the
    backends keep their own connection."""
    import paho.mqtt.client as mqtt  # only this helper needs paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    if username or password:
        client.username_pw_set(username, password)
    client.connect(host, port)
    client.loop_start()
    try:
        info = client.publish(topic, json.dumps(message).encode(), qos=1)
        info.wait_for_publish(timeout=30)
        time.sleep(sleep)
    finally:
        client.disconnect()
        client.loop_stop()
