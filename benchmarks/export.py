"""Benchmark `export`: `ivy messages` streaming a year of daily archive files
to JSONL, side by side with reading the same files with the standard library
alone (open + json.loads per line)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from unittest import mock

from src import constants
from src.utils.message_export import select_messages, write_messages

from .common import Figure, median_of_alternating, rate

_DAY_SECONDS = 86_400
_START = 1_735_689_600.0  # 2025-01-01 UTC


def _write_archive(directory: str, days: int, per_day: int) -> int:
    """`days` daily files of `per_day` data messages each, as the archive has them."""
    os.makedirs(directory, exist_ok=True)
    for day in range(days):
        start = _START + day * _DAY_SECONDS
        name = time_name(start)
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            for i in range(per_day):
                timestamp = start + i * (_DAY_SECONDS / per_day)
                f.write(
                    f'{{"identifier":"bench-{day * per_day + i}","timestamp":{timestamp!r},'
                    f'"config_revision":3,"body":{{"variant":"data","data":'
                    f'{{"co2_ppm":{400 + i % 50 * 0.1!r},"temperature_c":21.5}}}}}}\n'
                )
    return days * per_day


def time_name(timestamp: float) -> str:
    """The archive file name (UTC date) of a timestamp."""
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d")


def _stdlib_read(directory: str) -> int:
    count = 0
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            for line in f:
                json.loads(line)
                count += 1
    return count


def run(quick: bool) -> Iterator[Figure]:
    """Figure rows_per_second."""
    days = 30 if quick else 365
    per_day = 2_000
    with tempfile.TemporaryDirectory(prefix="ivy-bench-export-") as directory:
        archive = os.path.join(directory, "messages")
        total = _write_archive(archive, days, per_day)
        with (
            mock.patch.object(constants, "MESSAGE_ARCHIVE_DIR", archive),
            mock.patch.object(constants, "MESSAGE_QUEUE_PATH", os.path.join(directory, "none")),
        ):

            def export() -> None:
                written = write_messages(select_messages(), io.StringIO(), "jsonl")
                assert written == total

            def read() -> None:
                assert _stdlib_read(archive) == total

            def ours() -> float:
                return rate(total, export)

            def baseline() -> float:
                return rate(total, read)

            value, baseline_value = median_of_alternating(3, ours, baseline)
    yield Figure(
        "export",
        "rows_per_second",
        value,
        f"messages/s, `ivy messages --format jsonl` over {days} daily files of {per_day:,}",
        "the same files read with open + json.loads per line (standard library)",
        baseline_value,
    )
