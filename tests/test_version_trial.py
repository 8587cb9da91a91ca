"""Never bricked: a new version that passes its tests but fails on the station
(crashes at import, a procedure crash-loops, it hangs, its backend never
connects) is rolled back by the previous version's guard, which then runs
again and reports the rejection; a kill -9 of the guard during a trial ends,
after `ivy start`, on one version. Production roots made by `ivy setup`."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from benchmarks.production import (
    BASE,
    CRASHES_AT_IMPORT,
    GOOD,
    HANGS,
    NEVER_CONNECTS,
    PROCEDURE_CRASH_LOOPS,
    ProductionStation,
)
from tests.conftest import wait_until
from tests.production_fixtures import (
    ConnectedStation,
    apply,
    archived_data_identifiers,
    delivered_data_identifiers,
    start,
)

pytestmark = [pytest.mark.integration, pytest.mark.updater]


_QUICK_TRIAL = {"deadline_seconds": 30, "stable_seconds": 2, "max_starts": 3}


def _journal(station: ProductionStation) -> dict[str, Any]:
    with open(os.path.join(station.root, "data", "update-journal.json")) as f:
        result: dict[str, Any] = json.load(f)
    return result


def _outcome(station: ProductionStation, revision: int) -> dict[str, Any] | None:
    """The latest outcome of a config revision."""
    for outcome in reversed(station.state().get("config_outcomes", [])):
        if outcome["config_revision"] == revision:
            return dict(outcome)
    return None


def _rolled_back(station: ProductionStation, version: str, revision: int, reason: str) -> None:
    path = station.config_file(f"v{version}.json", version, revision, trial=_QUICK_TRIAL)
    assert apply(station, path, wait=0).returncode == 0
    assert wait_until(lambda: _outcome(station, revision) is not None, timeout=240, interval=0.5)
    outcome = _outcome(station, revision)
    assert outcome is not None and outcome["status"] == "rejected", outcome
    assert f"version {version} was rolled back to {BASE}" in outcome["reason"]
    assert reason in outcome["reason"], outcome["reason"]
    assert station.pointed_version() == BASE
    assert wait_until(lambda: station.running_versions() == {BASE}, timeout=30)
    journal = _journal(station)
    assert journal["current"] == BASE and journal["candidate"] is None
    assert version in journal["bad_versions"]
    assert os.path.isdir(os.path.join(station.root, version))  # kept for a look
    # the same version is not tried again
    again = station.config_file("again.json", version, revision + 1, trial=_QUICK_TRIAL)
    refused = apply(station, again, wait=30)
    assert refused.returncode == 1 and "was rolled back on this station before" in refused.stderr


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        (CRASHES_AT_IMPORT, "this release cannot import its main loop"),
        (PROCEDURE_CRASH_LOOPS, "dummy_procedure is crash-looping"),
        (HANGS, "the main loop has not written a heartbeat since the change"),
    ],
    ids=["crashes-at-import", "procedure-crash-loops", "hangs"],
)
def test_a_version_that_fails_on_the_station_is_rolled_back(
    version: str, reason: str, production_station: ProductionStation
) -> None:
    station = production_station
    start(station)
    _rolled_back(station, version, 5, reason)
    assert station.cli("stop").returncode == 0
    assert station.processes() == []


def test_a_version_whose_backend_never_connects_is_rolled_back_and_the_rejection_arrives(
    connected_station: ConnectedStation,
) -> None:
    station, backend, subscriber = (
        connected_station.station,
        connected_station.backend,
        connected_station.subscriber,
    )
    path = station.config_file("never.json", NEVER_CONNECTS, 5, trial=_QUICK_TRIAL, backend=backend)
    assert apply(station, path, wait=0).returncode == 0

    def rejection() -> list[dict[str, Any]]:
        return [
            item["values"]
            for item in subscriber.items("v1/devices/me/telemetry")
            if item["values"].get("config_revision") == 5
            and item["values"].get("config_status") == "rejected"
        ]

    assert wait_until(lambda: bool(rejection()), timeout=240, interval=0.5)
    answer = rejection()[0]
    assert answer["sw_state"] == "FAILED"
    assert "the backend is not connected to the broker" in answer["sw_error"]
    assert station.running_versions() == {BASE}
    assert station.cli("stop").returncode == 0


@pytest.mark.parametrize("target", ["switch", "guard", "candidate"])
def test_kill_9_during_a_trial_ends_on_one_version_with_no_message_lost(
    target: str,
    connected_station: ConnectedStation,
) -> None:
    """The old main loop killed right after the switch (while it hands over),
    or the guard killed: the next `ivy start` resumes the trial as a guard.
    The candidate killed: its guard starts it again. Either way the good
    version is committed, and every measurement reaches the broker."""
    station, backend, subscriber = (
        connected_station.station,
        connected_station.backend,
        connected_station.subscriber,
    )
    old_mainloop = station.state()["mainloop"]["pid"]
    path = station.config_file("good.json", GOOD, 7, trial=_QUICK_TRIAL, backend=backend)
    assert apply(station, path, wait=0).returncode == 0

    def pid_of(role: str) -> int | None:
        candidate = _journal(station).get("candidate") or {}
        if candidate.get("attempts", 0) < 1:
            return None  # the guard has not started the candidate yet
        mainloop = station.state().get("mainloop", {})
        pid: int | None = mainloop.get("guard_pid")
        if role == "candidate":
            pid = mainloop.get("pid") if pid is not None and mainloop.get("pid") != pid else None
        return pid

    if target == "switch":
        assert wait_until(lambda: _journal(station).get("candidate") is not None, 240, 0.01)
        os.kill(old_mainloop, signal.SIGKILL)
    else:
        assert wait_until(lambda: pid_of(target) is not None, timeout=240, interval=0.1)
        os.kill(pid_of(target) or 0, signal.SIGKILL)
    if target in ("switch", "guard"):
        assert wait_until(lambda: station.processes() == [], timeout=30)
        assert _journal(station)["candidate"]["version"] == GOOD
        start(station)  # the previous version's start resumes the trial as its guard

    assert wait_until(lambda: _outcome(station, 7) is not None, timeout=240, interval=0.5)
    outcome = _outcome(station, 7)
    assert outcome is not None and outcome["status"] == "accepted", outcome
    assert station.pointed_version() == GOOD
    assert wait_until(lambda: station.running_versions() == {GOOD}, timeout=30)
    journal = _journal(station)
    assert (journal["current"], journal["previous"], journal["candidate"]) == (GOOD, BASE, None)
    # every start counts, the interrupted one too: a candidate that keeps
    # taking the station down with it runs out of starts
    # (killed at the switch: the candidate had not started yet, or just had)
    starts = ("start 1 of 3", "start 2 of 3") if target == "switch" else ("start 2 of 3",)
    assert any(s in journal["last_outcome"] for s in starts), journal["last_outcome"]

    received = len(delivered_data_identifiers(subscriber.items()))
    assert wait_until(
        lambda: len(delivered_data_identifiers(subscriber.items())) >= received + 2, 60
    )
    assert station.cli("stop").returncode == 0
    archived = archived_data_identifiers(station.root)
    assert len(archived) > 10
    assert wait_until(
        lambda: set(archived) <= set(delivered_data_identifiers(subscriber.items())), 30
    ), "measurements lost across the trial"


def test_a_good_version_is_committed_older_ones_go_and_ivy_rollback_goes_back(
    production_station: ProductionStation,
) -> None:
    station = production_station
    older = os.path.join(station.root, "0.0.9")
    os.makedirs(os.path.join(older, ".venv"))  # a version from before the previous one
    start(station)
    path = station.config_file("good.json", GOOD, 8, trial=_QUICK_TRIAL)
    result = apply(station, path, wait=240)
    assert result.returncode == 0 and "accepted" in result.stdout, result.stdout + result.stderr
    assert station.pointed_version() == GOOD
    assert wait_until(lambda: station.running_versions() == {GOOD}, timeout=30)
    journal = _journal(station)
    assert (journal["current"], journal["previous"]) == (GOOD, BASE)
    assert "committed" in journal["last_outcome"]
    assert not os.path.exists(older)  # removed after the commit
    assert os.path.isfile(os.path.join(station.root, BASE, ".venv", "bin", "python"))

    rolled = station.cli("rollback", timeout=300)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert station.pointed_version() == BASE
    assert wait_until(lambda: station.running_versions() == {BASE}, timeout=60)
    assert wait_until(lambda: (_outcome(station, 8) or {}).get("status") == "rejected", 60)
    journal = _journal(station)
    assert journal["current"] == BASE and GOOD in journal["bad_versions"]
    assert station.cli("rollback").returncode == 1  # nothing further back
    assert station.cli("stop").returncode == 0
