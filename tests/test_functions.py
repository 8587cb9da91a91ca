"""Small helpers."""

from __future__ import annotations

import os
from typing import Any

import pytest

from src.utils.functions import (
    capped_exponential_delay,
    delete_expired_dated_files,
    get_time_to_next_datapoint,
    utc_date_string,
)

pytestmark = pytest.mark.quick


def test_datapoints_align_to_multiples_of_the_interval() -> None:
    assert get_time_to_next_datapoint(10, now=1000.0) == 10
    assert get_time_to_next_datapoint(10, now=1003.5) == pytest.approx(6.5)
    assert get_time_to_next_datapoint(60, now=1799.0) == pytest.approx(1.0)


def test_backoff_grows_and_is_capped() -> None:
    delays = [capped_exponential_delay(n, 0.25, 60) for n in range(12)]
    assert delays[:4] == [0.0, 0.25, 0.5, 1.0]
    assert delays[-1] == 60
    assert delays == sorted(delays)
    assert capped_exponential_delay(10_000, 1, 30) == 30


def test_utc_date() -> None:
    assert utc_date_string(1_700_000_000) == "2023-11-14"


def test_retention_deletes_only_old_dated_files(tmp_path: Any) -> None:
    tmp_path = tmp_path / "dated"
    tmp_path.mkdir()
    for name in (
        "2023-01-01.log",
        "2023-01-31.jsonl",
        "2023-02-01.log",
        "notes.txt",
        "2023-13-01.log",
    ):
        (tmp_path / name).write_text("x")
    now = 1_675_814_400.0  # 2023-02-08 UTC
    deleted = delete_expired_dated_files(str(tmp_path), retention_days=7, now=now)
    assert deleted == ["2023-01-01.log", "2023-01-31.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["2023-02-01.log", "2023-13-01.log", "notes.txt"]
    assert delete_expired_dated_files(str(tmp_path / "missing"), 7) == []
