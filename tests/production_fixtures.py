"""Fixtures for tests on a production root made by `ivy setup` (see
`benchmarks.production`): the releases repository and uv's cache, shared by
a module's tests, and stations that are killed whatever happens."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from benchmarks.mosquitto import Broker
from benchmarks.production import ProductionStation, Releases, make_releases, set_up_station
from tests.mqtt_helpers import Subscriber, broker_fixture


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(str(tmp_path_factory.mktemp("releases") / "ivy"))


@pytest.fixture(scope="session")
def package_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """uv's package cache, shared by every test and every xdist worker of the
    run (uv locks its cache), so that each package is downloaded once."""
    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own basetemp in the run's
        run = run.parent
    directory = run / "shared-uv-cache"
    directory.mkdir(exist_ok=True)
    return str(directory)


def set_up(
    tmp_path: Any, releases: Releases, package_cache: str, **changes: Any
) -> ProductionStation:
    return set_up_station(str(tmp_path / "station-root"), releases, package_cache, **changes)


@pytest.fixture
def killer() -> Iterator[list[ProductionStation]]:
    """Kills every process of the stations a test registers, whatever happened."""
    stations: list[ProductionStation] = []
    yield stations
    for station in stations:
        for p in station.processes():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


@pytest.fixture
def production_station(
    tmp_path: Any, releases: Releases, package_cache: str, killer: list[ProductionStation]
) -> ProductionStation:
    """Version BASE set up in a production root (not started)."""
    made = set_up(tmp_path, releases, package_cache)
    killer.append(made)
    return made


def start(station: ProductionStation) -> None:
    result = station.cli("start", timeout=120)
    assert result.returncode == 0, result.stderr


def apply(
    station: ProductionStation, path: str, wait: float = 300
) -> subprocess.CompletedProcess[str]:
    return station.cli("config", "apply", path, "--wait", str(wait), timeout=wait + 60)


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


@dataclass
class ConnectedStation:
    """A started station with a ThingsBoard backend on the test's broker, and
    a subscriber in the server's place."""

    station: ProductionStation
    backend: dict[str, Any]
    subscriber: Subscriber


@pytest.fixture
def connected_station(
    tmp_path: Any,
    releases: Releases,
    package_cache: str,
    killer: list[ProductionStation],
    broker: Broker,
) -> Iterator[ConnectedStation]:
    """Version BASE set up with a backend on `broker`, started."""
    backend = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": broker.port,
        "mqtt_client_id": "station-under-update",
    }
    made = set_up(tmp_path, releases, package_cache, backend=backend)
    killer.append(made)
    subscriber = Subscriber(broker.port, ["v1/devices/me/telemetry"], client_id="tb-server")
    start(made)
    yield ConnectedStation(made, backend, subscriber)
    subscriber.close()


def delivered_data_identifiers(items: list[dict[str, Any]]) -> list[str]:
    """The identifiers of the dummy procedure's data in ThingsBoard items."""
    return [
        item["values"]["message_identifier"]
        for item in items
        if "message_identifier" in item["values"] and "random_walk" in item["values"]
    ]


def archived_data_identifiers(root: str) -> list[str]:
    """The identifiers of every data message in a root's archive."""
    identifiers = []
    for path in sorted(glob.glob(os.path.join(root, "data", "messages", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if entry["body"]["variant"] == "data":
                    identifiers.append(entry["identifier"])
    return identifiers
