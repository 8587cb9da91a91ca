"""The short chaos run (`benchmarks.chaos`, a fixed seed, about two minutes of
faults): a whole station through its CLI with two destinations (Tenta with a
failover address, ThingsBoard) on real Mosquittos, every kind of fault at
least once. Nothing accepted may be lost for either destination, and each
destination's cap must have dropped exactly what it counted, oldest first."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from benchmarks.chaos.harness import FAULT_KINDS, Settings, run_chaos
from benchmarks.chaos.report import oldest_first_violations


def _fates(arrivals: list[float | None]) -> tuple[dict[Any, float], dict[Any, float]]:
    """One producer's messages 0..n-1, produced a second apart, with these
    arrival times (None: missing)."""
    produced = {(1, seq): float(seq) for seq in range(len(arrivals))}
    arrived = {(1, seq): at for seq, at in enumerate(arrivals) if at is not None}
    return produced, arrived


def test_the_oldest_first_check_accepts_a_fifo_across_two_outages() -> None:
    # outage 1 from 10 to 20 drops 2..5 (0 and 1 were in flight); the backlog
    # 6..8 is half delivered when outage 2 (from 24) drops 8 and 9
    produced, arrived = _fates([21.0, 21.0, None, None, None, None, 22.0, 23.0, None, None, 31.0])
    outages = [{"back": 20.0, "seconds": 10.0}, {"back": 30.0, "seconds": 6.0}]
    assert oldest_first_violations(produced, arrived, outages) == 0


def test_the_oldest_first_check_catches_dropping_the_newest() -> None:
    # the outage from 10 to 20 kept the old backlog and dropped what came later
    produced, arrived = _fates([9.0, 21.0, 21.0, None, 22.0, None, None, 23.0])
    outages = [{"back": 20.0, "seconds": 10.0}]
    assert oldest_first_violations(produced, arrived, outages) == 2


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_short_chaos_run_loses_nothing(tmp_path: Any) -> None:
    report = run_chaos(Settings(seed=11, duration_s=100.0), str(tmp_path))
    print(json.dumps(report, indent=2))  # the report, in the test's output
    kinds = {event["kind"] for event in report["faults"] if "skipped" not in event}
    missing_kinds = set(FAULT_KINDS) - kinds
    if report["full_disk_unavailable"] is not None:
        # a tmpfs needs root and a container that allows mounting
        assert os.geteuid() != 0 or "mount refused" in report["full_disk_unavailable"]
        missing_kinds.discard("full_disk")
    assert not missing_kinds
    assert report["produced"] > 5_000
    for destination in ("backend", "monitoring"):
        counts = report["destinations"][destination]
        assert counts["lost"] == 0, destination
        assert counts["missing"] == counts["dropped_by_policy"], destination
        # each one's cap was reached during an outage of its own broker
        assert counts["dropped_by_policy"] > 0, destination
        assert counts["oldest_first_violations"] == 0, destination
    # the primary went away, the failover address took over, the primary came back
    assert report["failovers"]
    assert all(
        f["on_failover_address_after_s"] is not None and f["back_on_primary_after_s"] is not None
        for f in report["failovers"]
    )
    assert report["not_in_archive"] == 0
    assert report["payloads_a_server_would_drop"] == 0
    assert None not in report["queue_back_to_steady_after_outage_s"]
    assert report["problems"] == []
    assert report["ok"]
