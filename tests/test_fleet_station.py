"""A station's side of a fleet, with a real station (main loop, procedure,
Tenta backend) on a real Mosquitto: its retained state report and presence
(offline by a clean stop and by its last will), a signed merge patch merged
into its running config without its secrets travelling, a signed revert to
the config before a revision, a refused payload named by its digest in the
report, and a broker whose ACL refuses the fleet topics costing the data
nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from src.types.fleet import StationReport, presence_topic, state_topic
from tests.conftest import Station, operator_key, template_config_dict, wait_until
from tests.mqtt_helpers import Subscriber, broker_fixture, publish

pytestmark = pytest.mark.integration

STATION = "7a1e4c2b-9d3f-4e5a-8b6c-1d2e3f4a5b6c"
SECRET = "station-secret-7f3a"


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


def tenta_station_config(port: int, **backend: Any) -> dict[str, Any]:
    config = template_config_dict()
    config["general"]["system_identifier"] = STATION
    config["general"]["config_revision"] = 1
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"] = None
    config["backend"] = {
        "provider": "tenta",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": port,
        "mqtt_client_id": "fleet-station",
        "mqtt_username": "station",
        "mqtt_password": SECRET,
        "reconnect_max_seconds": 2,
        **backend,
    }
    return config


def latest(subscriber: Subscriber, topic: str) -> dict[str, Any] | None:
    with subscriber.lock:
        payloads = [p for t, p in subscriber.messages if t == topic and p]
    return json.loads(payloads[-1]) if payloads else None


def report(subscriber: Subscriber) -> StationReport | None:
    raw = latest(subscriber, state_topic(STATION))
    return None if raw is None else StationReport.model_validate(raw)


def acknowledged(subscriber: Subscriber, revision: int) -> bool | None:
    for item in subscriber.items(f"acknowledgments/{STATION}"):
        if item["revision"] == revision:
            return bool(item["success"])
    return None


def push(port: int, revision: int, configuration: Any) -> bytes:
    payload = json.dumps({"revision": revision, "configuration": configuration}).encode()
    publish(port, f"configurations/{STATION}", payload, retain=True)
    return payload


def running_config(station: Station) -> dict[str, Any]:
    with open(os.path.join(station.project_dir, "config", "config.json")) as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def test_state_report_presence_patch_revert_and_refusal(station: Station, broker: Broker) -> None:
    station.write_config(tenta_station_config(broker.port))
    recorder = Subscriber(
        broker.port,
        ["ivy/#", f"acknowledgments/{STATION}", f"measurements/{STATION}"],
        client_id="fleet-recorder",
    )
    try:
        assert station.cli("start").returncode == 0
        assert wait_until(
            lambda: (r := report(recorder)) is not None and r.healthy, timeout=90, interval=0.5
        ), latest(recorder, state_topic(STATION))
        first = report(recorder)
        assert first is not None and first.config_revision == 1 and first.running
        assert (latest(recorder, presence_topic(STATION)) or {}).get("online") is True
        assert SECRET not in json.dumps(latest(recorder, state_topic(STATION)))

        # a merge patch: only the setting to change travels, the station keeps its secrets
        patch = {"dummy_procedure": {"seconds_between_datapoints": 2}}
        push(broker.port, 2, operator_key().sign_change(patch, [STATION], "patch"))
        assert wait_until(lambda: acknowledged(recorder, 2) is not None, timeout=120, interval=0.5)
        assert acknowledged(recorder, 2) is True
        patched = running_config(station)
        assert patched["general"]["config_revision"] == 2
        assert patched["dummy_procedure"]["seconds_between_datapoints"] == 2
        assert patched["backend"]["mqtt_password"] == SECRET
        assert wait_until(
            lambda: (
                (r := report(recorder)) is not None
                and r.last_config is not None
                and (r.last_config.revision, r.last_config.status) == (2, "accepted")
            ),
            timeout=60,
            interval=0.5,
        )

        # a revert: the config that ran before revision 2, under revision 3
        push(broker.port, 3, operator_key().sign_change(2, [STATION], "revert"))
        assert wait_until(lambda: acknowledged(recorder, 3) is not None, timeout=120, interval=0.5)
        assert acknowledged(recorder, 3) is True
        reverted = running_config(station)
        assert reverted["general"]["config_revision"] == 3
        assert reverted["dummy_procedure"]["seconds_between_datapoints"] == 1

        # a patch signed by nobody the station trusts: refused, named by its digest
        envelope = operator_key().sign_change({"system_checks": None}, [STATION], "patch")
        tampered = {**envelope, "signed": envelope["signed"].replace("system_checks", "x")}
        payload = push(broker.port, 4, tampered)
        digest = hashlib.sha256(payload).hexdigest()
        assert wait_until(
            lambda: (
                (r := report(recorder)) is not None
                and r.last_refused is not None
                and r.last_refused.digest == digest
            ),
            timeout=60,
            interval=0.5,
        )
        assert running_config(station)["general"]["config_revision"] == 3

        assert station.cli("stop").returncode == 0
        assert wait_until(
            lambda: (latest(recorder, presence_topic(STATION)) or {}).get("online") is False,
            timeout=30,
        )
    finally:
        recorder.close()


def test_a_broker_that_refuses_the_fleet_topics_costs_the_data_nothing(
    station: Station, tmp_path: Any
) -> None:
    acl = tmp_path / "acl"
    acl.write_text(
        "user station\n"
        + "".join(
            f"topic readwrite {kind}/{STATION}\n"
            for kind in ("measurements", "logs", "acknowledgments", "configurations")
        )
    )
    with Broker.running(
        str(tmp_path / "acl-broker"),
        users={"station": SECRET},
        extra_lines=(f"acl_file {acl}",),
    ) as broker:
        station.write_config(tenta_station_config(broker.port, mqtt_protocol="5"))
        assert station.cli("start").returncode == 0
        log_path = station.path("logs")

        def log_says(text: str) -> bool:
            if not os.path.isdir(log_path):
                return False
            return any(
                text in open(os.path.join(log_path, name), errors="replace").read()
                for name in os.listdir(log_path)
            )

        assert wait_until(
            lambda: log_says("not publishing the station's state report for an hour"),
            timeout=90,
            interval=0.5,
        )
        depth = station.status()["queue"]["depth"]
        assert wait_until(lambda: station.status()["queue"]["depth"] <= 2, timeout=60), depth
        status = station.status()
        assert status["destinations"]["backend"]["connection"]["connected"] is True
        assert station.cli("stop").returncode == 0
