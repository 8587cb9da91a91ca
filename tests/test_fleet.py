"""`ivy fleet` against real stations (each a main loop, a procedure and a
Tenta backend) sharing one real Mosquitto: status of them all, a rollout wave
by wave with a station away (it takes the change when it starts again), a
rollback, a canary that fails its trial halting the rollout with no other
station touched, a rollout that resumes after its own process is killed, and
`ivy fleet halt` mid-wave."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.mosquitto import Broker, free_port
from tests.conftest import (
    PROJECT_DIR,
    Station,
    kill_station,
    make_station,
    operator_key,
    template_config_dict,
    wait_until,
)
from tests.mqtt_helpers import broker_fixture

pytestmark = pytest.mark.integration

STATIONS = [
    "0a6f1b2c-3d4e-4f5a-8b6c-7d8e9f0a1b2c",
    "1b7a2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d",
    "2c8b3d4e-5f6a-4b7c-8d8e-9f0a1b2c3d4e",
]


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


class Fleet:
    """Stations on one broker, an inventory, and the operator's store."""

    def __init__(self, directory: str, broker: Broker, stable_seconds: int = 1) -> None:
        self.directory = directory
        self.broker = broker
        self.stations: dict[str, Station] = {}
        for index, identifier in enumerate(STATIONS):
            station = make_station(os.path.join(directory, f"station-{index}"))
            config = template_config_dict()
            config["general"]["system_identifier"] = identifier
            config["general"]["config_revision"] = 1
            config["dummy_procedure"]["seconds_between_datapoints"] = 1
            config["system_checks"] = None
            config["trial"] = {
                "deadline_seconds": 30,
                "stable_seconds": stable_seconds,
                "max_starts": 3,
            }
            config["backend"] = {
                "provider": "tenta",
                "mqtt_host": "127.0.0.1",
                "mqtt_port": broker.port,
                "mqtt_client_id": f"station-{index}",
                "mqtt_password": f"secret-of-station-{index}",
                "reconnect_max_seconds": 2,
                "max_drain_time": 5,
            }
            station.write_config(config)
            self.stations[identifier] = station
        self.inventory = os.path.join(directory, "inventory.json")
        with open(self.inventory, "w") as f:
            json.dump(
                {
                    "broker": {
                        "mqtt_host": "127.0.0.1",
                        "mqtt_port": broker.port,
                        "mqtt_client_id": "operator",
                    },
                    "stations": [
                        {"id": s, "groups": ["site-a" if i < 2 else "site-b"]}
                        for i, s in enumerate(STATIONS)
                    ],
                },
                f,
            )
        self.store = os.path.join(directory, "fleet.sqlite3")

    def start(self, identifier: str) -> None:
        assert self.stations[identifier].cli("start").returncode == 0

    def ivy(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, os.path.join(PROJECT_DIR, "cli.py"), "fleet", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, os.path.join(PROJECT_DIR, "cli.py"), "fleet", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self) -> dict[str, Any]:
        result = self.ivy("status", "--inventory", self.inventory, "--json")
        assert result.returncode in (0, 3), result.stderr
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def conditions(self) -> dict[str, str]:
        return {s["station"]: s["condition"] for s in self.status()["stations"]}

    def revisions(self) -> dict[str, int | None]:
        """Each station's config revision once it was accepted (not on trial)."""
        found: dict[str, int | None] = {}
        for s in self.status()["stations"]:
            report = s["report"] or {}
            last = report.get("last_config") or {}
            accepted = last.get("status") == "accepted" and last.get("revision") == report.get(
                "config_revision"
            )
            found[s["station"]] = report.get("config_revision") if accepted else None
        return found

    def rollout_args(self, change: dict[str, Any], *options: str) -> list[str]:
        path = os.path.join(self.directory, f"change-{abs(hash(json.dumps(change)))}.json")
        with open(path, "w") as f:
            json.dump(change, f)
        return [
            "rollout",
            path,
            "--inventory",
            self.inventory,
            "--key",
            operator_key().private,
            "--store",
            self.store,
            *options,
        ]

    def targets(self) -> dict[str, str]:
        """The newest rollout's stations and their status ({} before it is stored)."""
        if not os.path.exists(self.store):
            return {}
        with sqlite3.connect(self.store) as db:
            try:
                rows = db.execute(
                    "SELECT station, status FROM targets "
                    "WHERE rollout = (SELECT max(id) FROM rollouts)"
                ).fetchall()
            except sqlite3.OperationalError:  # the rollout is creating it
                return {}
        return dict(rows)

    def setting(self, identifier: str) -> int:
        path = os.path.join(self.stations[identifier].project_dir, "config", "config.json")
        with open(path) as f:
            value: int = json.load(f)["dummy_procedure"]["seconds_between_datapoints"]
            return value

    def kill_all(self) -> None:
        for station in self.stations.values():
            kill_station(station)


@pytest.fixture
def fleet(tmp_path: Any, broker: Broker) -> Iterator[Fleet]:
    f = Fleet(str(tmp_path), broker)
    try:
        yield f
    finally:
        f.kill_all()


def all_healthy(fleet: Fleet, stations: list[str]) -> bool:
    conditions = fleet.conditions()
    return all(conditions[s] == "healthy" for s in stations)


def test_a_rollout_goes_wave_by_wave_an_away_station_takes_it_later_and_rollback(
    fleet: Fleet,
) -> None:
    # the away station is first in the inventory: the canary wave takes the
    # next station in its place, so that the canary is one that can answer
    away, first, second = STATIONS
    for identifier in STATIONS:
        fleet.start(identifier)
    assert wait_until(lambda: all_healthy(fleet, STATIONS), timeout=120, interval=1)
    assert fleet.ivy("status", "--inventory", fleet.inventory).returncode == 0
    assert fleet.stations[away].cli("stop").returncode == 0
    assert wait_until(lambda: fleet.conditions()[away] == "unreachable", timeout=60, interval=1)
    status = fleet.ivy("status", "--inventory", fleet.inventory)
    assert status.returncode == 3 and "unreachable" in status.stdout

    change = {"dummy_procedure": {"seconds_between_datapoints": 2}}
    result = fleet.ivy(*fleet.rollout_args(change, "--waves", "1,100%", "--json"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "done"
    assert sorted(s["station"] for s in report["stations"]["accepted"]) == sorted([first, second])
    assert [s["station"] for s in report["stations"]["unreachable"]] == [away]
    # wave by wave: the canary answered before the second wave was sent
    lines = result.stderr.splitlines()
    canary_answer = next(i for i, line in enumerate(lines) if f"{first}: accepted" in line)
    second_sent = next(i for i, line in enumerate(lines) if f"sent to {second}" in line)
    assert canary_answer < second_sent, result.stderr
    assert f"{first} joins this wave" in result.stderr
    revision = report["revision"]
    assert fleet.setting(first) == fleet.setting(second) == 2
    assert fleet.setting(away) == 1

    # the station that was away takes the change when it starts again
    fleet.start(away)
    assert wait_until(
        lambda: set(fleet.revisions().values()) == {revision}, timeout=120, interval=1
    ), fleet.revisions()
    assert fleet.setting(away) == 2

    # one station has moved on since (a later change for its site alone)
    later = {"dummy_procedure": {"seconds_between_datapoints": 3}}
    result = fleet.ivy(*fleet.rollout_args(later, "--group", "site-b", "--json"))
    assert result.returncode == 0, result.stderr
    assert fleet.setting(second) == 3

    # rollback: the stations that took it run the config from before it
    # again; the one that moved on keeps the later change
    result = fleet.ivy(
        "rollback",
        "--inventory",
        fleet.inventory,
        "--key",
        operator_key().private,
        "--store",
        fleet.store,
        "--rollout",
        str(report["rollout"]),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert f"{second} runs revision {revision + 1} now, not {revision}: left alone" in (
        result.stderr
    )
    rolled_back = json.loads(result.stdout)
    assert sorted(s["station"] for s in rolled_back["stations"]["accepted"]) == sorted(
        [away, first]
    )
    assert fleet.setting(away) == fleet.setting(first) == 1
    assert fleet.setting(second) == 3
    assert wait_until(lambda: fleet.revisions()[first] == rolled_back["revision"], timeout=60)


def test_a_canary_that_fails_its_trial_halts_the_rollout_and_touches_no_other(
    fleet: Fleet,
) -> None:
    for identifier in STATIONS:
        fleet.start(identifier)
    assert wait_until(lambda: all_healthy(fleet, STATIONS), timeout=120, interval=1)
    broken = {"backend": {"mqtt_port": free_port()}}  # valid, but never connects
    result = fleet.ivy(*fleet.rollout_args(broken, "--waves", "1,100%", "--json"))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "halted"
    (rejected,) = report["stations"]["rejected"]
    assert rejected["station"] == STATIONS[0]
    assert sorted(s["station"] for s in report["stations"]["not_sent"]) == sorted(STATIONS[1:])
    assert fleet.targets()[STATIONS[0]] == "rejected"
    reports = {s["station"]: s["report"] for s in fleet.status()["stations"]}
    assert reports[STATIONS[1]]["config_revision"] == reports[STATIONS[2]]["config_revision"] == 1
    assert wait_until(lambda: all_healthy(fleet, STATIONS), timeout=120, interval=1)


def test_a_killed_rollout_resumes_and_halt_stops_one_mid_wave(
    tmp_path: Any, broker: Broker
) -> None:
    fleet = Fleet(str(tmp_path / "slow"), broker, stable_seconds=8)
    try:
        for identifier in STATIONS:
            fleet.start(identifier)
        assert wait_until(lambda: all_healthy(fleet, STATIONS), timeout=120, interval=1)

        # killed while waiting for the canary: run again, it resumes and finishes
        args = fleet.rollout_args({"dummy_procedure": {"seconds_between_datapoints": 3}})
        process = fleet.popen(*args, "--waves", "1,100%")
        assert wait_until(lambda: "sent" in fleet.targets().values(), timeout=60)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        result = fleet.ivy(*args, "--waves", "1,100%", "--json")
        assert result.returncode == 0, result.stderr
        assert "resuming rollout" in result.stderr
        assert len(json.loads(result.stdout)["stations"]["accepted"]) == 3
        assert all(fleet.setting(s) == 3 for s in STATIONS)

        # halted mid-wave: no station starts it afterwards
        args = fleet.rollout_args({"dummy_procedure": {"seconds_between_datapoints": 4}})
        process = fleet.popen(*args, "--waves", "1,2,100%", "--json")
        assert wait_until(lambda: fleet.targets().get(STATIONS[1]) == "sent", timeout=120)
        halted = fleet.ivy("halt", "--store", fleet.store)
        assert halted.returncode == 0, halted.stderr
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, stderr
        report = json.loads(stdout)
        assert report["state"] == "halted"
        assert [s["station"] for s in report["stations"]["not_sent"]] == [STATIONS[2]]
        assert fleet.targets()[STATIONS[2]] == "not_sent"
        assert fleet.setting(STATIONS[2]) == 3
    finally:
        fleet.kill_all()


def test_a_halt_reaches_a_station_that_was_away_when_it_was_sent(fleet: Fleet) -> None:
    away, joined, _ = STATIONS
    for identifier in STATIONS:
        fleet.start(identifier)
    assert wait_until(lambda: all_healthy(fleet, STATIONS), timeout=120, interval=1)
    assert fleet.stations[away].cli("stop").returncode == 0  # its session stays at the broker
    assert wait_until(lambda: fleet.conditions()[away] == "unreachable", timeout=60, interval=1)

    args = fleet.rollout_args({"dummy_procedure": {"seconds_between_datapoints": 5}})
    process = fleet.popen(*args, "--waves", "1,100%", "--json")
    assert wait_until(lambda: fleet.targets().get(joined) == "sent", timeout=120)
    assert fleet.targets()[away] == "sent"
    halted = fleet.ivy("halt", "--store", fleet.store)
    assert halted.returncode == 0, halted.stderr
    process.communicate(timeout=120)
    assert fleet.targets()[away] == "withdrawn"

    # back after the halt: nothing of the change waits for it
    fleet.start(away)
    assert wait_until(lambda: fleet.conditions()[away] == "healthy", timeout=120, interval=1)
    time.sleep(5)
    assert fleet.setting(away) == 1
    reports = {s["station"]: s["report"] for s in fleet.status()["stations"]}
    assert reports[away]["config_revision"] == 1
