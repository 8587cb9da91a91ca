"""A config that validates but cannot work on this station is tried, found
unhealthy and replaced by the previous one, which delivers again; the
rejection reaches the broker. Whole stations through the CLI, a real
Mosquitto, configs pushed the way ThingsBoard pushes them."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.chaos.station import build_clock_shim, step_wall_clock
from benchmarks.mosquitto import Broker
from tests.conftest import Station, signed, template_config_dict, wait_until
from tests.mqtt_helpers import Subscriber, broker_fixture, publish

pytestmark = pytest.mark.integration

TELEMETRY = "v1/devices/me/telemetry"

# a procedure whose one setting makes it crash at start: what an operator's
# typo in a real procedure's setting does
_FRAGILE_PROCEDURE = '''"""Crashes at start when told to."""

import time

import pydantic

from src.types import Config
from src.types.procedure import ProcedureInfo
from src.utils.messaging_agent import MessagingAgent
from src.types import DataMessageBody


class FragileConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    crash_at_start: bool = False


def run(config: Config, name: str) -> None:
    section = config.procedure_section(name, FragileConfig)
    if section is not None and section.crash_at_start:
        raise RuntimeError("the sensor port named in the config does not exist")
    agent = MessagingAgent(config)
    while True:
        agent.add_message(DataMessageBody(data={"fragile": 1}))
        time.sleep(1)


info = ProcedureInfo(run=run, config_model=FragileConfig)
'''


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(broker: Broker, revision: int) -> dict[str, Any]:
    config = template_config_dict()
    config["general"]["config_revision"] = revision
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"] = None
    config["trial"] = {"deadline_seconds": 30, "stable_seconds": 2, "max_starts": 3}
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": broker.port,
        "mqtt_client_id": "station-on-trial",
    }
    return config


def _answers(subscriber: Subscriber, revision: int) -> list[dict[str, Any]]:
    return [
        item["values"]
        for item in subscriber.items(TELEMETRY)
        if item["values"].get("config_revision") == revision
        and item["values"].get("config_status") in ("accepted", "rejected")
    ]


def _data_count(subscriber: Subscriber) -> int:
    return sum(1 for item in subscriber.items(TELEMETRY) if "random_walk" in item["values"])


def _run_station(station: Station, config: dict[str, Any]) -> None:
    station.write_config(config)
    result = station.cli("start")
    assert result.returncode == 0, result.stderr


def test_a_config_whose_broker_port_is_wrong_is_rolled_back_and_the_old_one_delivers(
    station: Station, broker: Broker
) -> None:
    subscriber = Subscriber(broker.port, [TELEMETRY], client_id="tb-server")
    _run_station(station, _config(broker, 1))
    assert wait_until(lambda: _data_count(subscriber) >= 2, timeout=60)
    wrong = _config(broker, 2)
    wrong["backend"]["mqtt_port"] = _free_port()
    publish(broker.port, "v1/devices/me/attributes", {"configuration": signed(wrong)})

    assert wait_until(lambda: bool(_answers(subscriber, 2)), timeout=120, interval=0.5)
    answer = _answers(subscriber, 2)[0]
    assert answer["config_status"] == "rejected"
    assert answer["config_reason"].startswith("the previous config is back: not healthy 30 s")
    assert "not connected to the broker" in answer["config_reason"]
    with open(os.path.join(station.project_dir, "config", "config.json")) as f:
        assert json.load(f)["backend"]["mqtt_port"] == broker.port
    delivered = _data_count(subscriber)
    assert wait_until(lambda: _data_count(subscriber) >= delivered + 2, timeout=60)
    assert station.status()["config"]["revision"] == 1
    subscriber.close()
    assert station.cli("stop").returncode == 0


def test_a_config_that_makes_a_procedure_crash_at_start_is_rolled_back(
    station: Station, broker: Broker
) -> None:
    with open(os.path.join(station.project_dir, "src", "procedures", "fragile.py"), "w") as f:
        f.write(_FRAGILE_PROCEDURE)
    subscriber = Subscriber(broker.port, [TELEMETRY], client_id="tb-server")
    good = _config(broker, 1)
    good["fragile"] = {"crash_at_start": False}
    _run_station(station, good)
    assert wait_until(lambda: _data_count(subscriber) >= 2, timeout=60)

    broken = _config(broker, 2)
    broken["fragile"] = {"crash_at_start": True}
    publish(broker.port, "v1/devices/me/attributes", {"configuration": signed(broken)})
    assert wait_until(lambda: bool(_answers(subscriber, 2)), timeout=60, interval=0.5)
    answer = _answers(subscriber, 2)[0]
    assert answer["config_status"] == "rejected"
    assert "fragile is crash-looping" in answer["config_reason"]
    assert "the sensor port named in the config does not exist" in answer["config_reason"]

    status = station.status()
    assert status["config"]["revision"] == 1
    assert wait_until(
        lambda: station.status()["processes"].get("fragile", {}).get("alive") is True, 30
    )
    delivered = _data_count(subscriber)
    assert wait_until(lambda: _data_count(subscriber) >= delivered + 2, timeout=60)

    fixed = _config(broker, 3)
    fixed["fragile"] = {"crash_at_start": False}
    fixed["dummy_procedure"]["seconds_between_datapoints"] = 2
    publish(broker.port, "v1/devices/me/attributes", {"configuration": signed(fixed)})
    assert wait_until(lambda: bool(_answers(subscriber, 3)), timeout=60, interval=0.5)
    assert _answers(subscriber, 3)[0]["config_status"] == "accepted"
    subscriber.close()
    assert station.cli("stop").returncode == 0


def test_a_good_config_stays_when_the_clock_steps_back_an_hour_during_its_trial(
    station: Station, broker: Broker, tmp_path: Any
) -> None:
    """NTP stepping the clock of a board without a real-time clock: the trial
    judges on the monotonic clock, so a healthy config is accepted, not rolled
    back at its deadline for reports that look an hour old."""
    clock_file = str(tmp_path / "clock-offset")
    step_wall_clock(clock_file, 0.0)
    station.env["LD_PRELOAD"] = build_clock_shim(str(tmp_path))
    station.env["IVY_CHAOS_CLOCK_FILE"] = clock_file
    subscriber = Subscriber(broker.port, [TELEMETRY], client_id="tb-server")
    _run_station(station, _config(broker, 1))
    assert wait_until(lambda: _data_count(subscriber) >= 2, timeout=60)

    good = _config(broker, 2)
    good["trial"]["stable_seconds"] = 5
    good["dummy_procedure"]["seconds_between_datapoints"] = 2

    def started_at() -> dict[str, Any]:
        with open(station.path("state.json")) as f:
            processes = json.load(f)["processes"]
        return {name: p["started_at"] for name, p in processes.items() if p["alive"]}

    before = started_at()
    publish(broker.port, "v1/devices/me/attributes", {"configuration": signed(good)})

    def children_of_revision_2_run() -> bool:
        now = started_at()
        return set(now) == set(before) and all(now[n] != before[n] for n in now)

    # stepped while the trial is on: after the children started, before they
    # have run for `stable_seconds`
    assert wait_until(children_of_revision_2_run, timeout=30, interval=0.05)
    step_wall_clock(clock_file, -3600.0)
    assert wait_until(lambda: bool(_answers(subscriber, 2)), timeout=90, interval=0.5)
    answer = _answers(subscriber, 2)[0]
    assert answer["config_status"] == "accepted", answer
    assert station.status()["config"]["revision"] == 2
    subscriber.close()
    assert station.cli("stop").returncode == 0
