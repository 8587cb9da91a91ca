"""One station, two destinations on two real brokers: a Tenta destination
("research", every variant) and a ThingsBoard one ("monitoring", data and
logs). Every payload either broker delivers is checked by the real servers'
rules (`tests.server_rules`, through `Subscriber`), and every test counts."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from benchmarks.mosquitto import Broker
from src.types import Config, ConfigMessageBody, DataMessageBody, LogMessageBody
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from tests.conftest import (
    BackendProcess,
    Station,
    point_data_paths_at,
    signed,
    template_config_dict,
    wait_until,
)
from tests.mqtt_helpers import (
    MQTTBroker,
    Subscriber,
    any_broker_fixture,
    broker_fixture,
    publish,
)

pytestmark = pytest.mark.integration

STATION = "5d0c2b1a-7e6f-4a3b-8c9d-0e1f2a3b4c5d"
TENTA_TOPICS = [f"measurements/{STATION}", f"logs/{STATION}", f"acknowledgments/{STATION}"]
THINGSBOARD_TOPICS = ["v1/devices/me/telemetry"]
T0 = 1_700_000_000.0


@pytest.fixture
def research_broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "research-broker"))


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def monitoring_broker(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[MQTTBroker]:
    """The ThingsBoard destination's broker: Mosquitto, or RabbitMQ's MQTT plugin."""
    yield from any_broker_fixture(request.param, str(tmp_path / "monitoring-broker"))


def two_destinations(research_port: int, monitoring_port: int, **monitoring: Any) -> dict[str, Any]:
    """A config with no `backend` section and two named destinations."""
    config = template_config_dict()
    config["general"]["system_identifier"] = STATION
    config["general"]["config_revision"] = 3
    config["backend"] = None
    config["backends"] = {
        "research": {
            "provider": "tenta",
            "mqtt_host": "127.0.0.1",
            "mqtt_port": research_port,
            "mqtt_client_id": "ivy-research",
            "max_drain_time": 30,
            "reconnect_max_seconds": 2,
        },
        "monitoring": {
            "provider": "thingsboard",
            "mqtt_host": "127.0.0.1",
            "mqtt_port": monitoring_port,
            "mqtt_client_id": "ivy-monitoring",
            "variants": ["data", "log"],
            "max_drain_time": 30,
            "reconnect_max_seconds": 2,
            **monitoring,
        },
    }
    return config


def registered_agent(config: dict[str, Any]) -> MessagingAgent:
    """The queue with the config's destinations registered, as the main loop
    registers them before it starts any process."""
    parsed = Config.model_validate(config)
    agent = MessagingAgent(parsed)
    agent.sync_destinations(parsed.destination_routes())
    return agent


def tenta_numbers(subscriber: Subscriber) -> list[int]:
    return [int(item["value"]["i"]) for item in subscriber.items("measurements/")]


def thingsboard_numbers(subscriber: Subscriber) -> list[int]:
    return [int(item["values"]["i"]) for item in subscriber.items("v1/") if "i" in item["values"]]


def thingsboard_logs(subscriber: Subscriber) -> list[dict[str, Any]]:
    return [item["values"] for item in subscriber.items("v1/") if "log_level" in item["values"]]


def data(i: int) -> DataMessageBody:
    return DataMessageBody(data={"i": float(i)})


def start(
    processes: list[BackendProcess], data_dir: str, config: dict[str, Any], name: str
) -> BackendProcess:
    process = BackendProcess(data_dir, config, destination=name)
    process.start()
    processes.append(process)
    return process


def test_a_destination_down_beyond_its_cap_costs_the_other_nothing_and_hears_of_its_gap(
    research_broker: Broker,
    monitoring_broker: MQTTBroker,
    data_dir: str,
    processes: list[BackendProcess],
) -> None:
    config = two_destinations(
        research_broker.port, monitoring_broker.port, max_queued_messages=1_000
    )
    research = Subscriber(research_broker.port, TENTA_TOPICS, client_id="research-recorder")
    monitoring = Subscriber(
        monitoring_broker.port, THINGSBOARD_TOPICS, client_id="monitoring-recorder"
    )
    monitoring_broker.stop()  # the recorder's session and subscription persist
    agent = registered_agent(config)
    start(processes, data_dir, config, "research")
    start(processes, data_dir, config, "monitoring")

    n = 3_000
    for batch in range(0, n, 500):
        agent.add_messages([data(i) for i in range(batch, batch + 500)], T0 + batch)
    log_id = agent.add_message(LogMessageBody(level="ERROR", subject="s", body="b"), T0 + n)
    agent.add_message(
        ConfigMessageBody(status="accepted", config_revision=3, software_version="0.1.0"),
        T0 + n,
    )

    # the destination that is up gets everything while the other is down
    assert wait_until(lambda: len(tenta_numbers(research)) >= n, timeout=60, interval=0.2)
    assert wait_until(lambda: len(research.items("acknowledgments/")) >= 1, timeout=30)
    assert sorted(set(tenta_numbers(research))) == list(range(n))
    # (the other backend's warnings about its broker are logs for both)
    assert wait_until(lambda: agent.get_queue_depth("research") == 0, timeout=30)
    assert agent.get_dropped_count(destination="research") == 0
    # the other's cap dropped its oldest data for it alone (the backends'
    # own warnings count against the cap too), and the physical queue holds
    # no more than that cap
    dropped = agent.get_dropped_count(destination="monitoring")
    assert dropped >= 2_000
    assert 900 <= agent.get_queue_depth("monitoring") <= 1_000
    assert agent.get_queue_depth() == agent.get_queue_depth("monitoring")

    monitoring_broker.start()
    assert wait_until(lambda: agent.get_queue_depth("monitoring") == 0, timeout=90, interval=0.2)
    assert wait_until(
        lambda: any(i["log_subject"].startswith("gap:") for i in thingsboard_logs(monitoring)),
        timeout=30,
        interval=0.2,
    )
    # what it never got is exactly what was counted, oldest first
    missing = set(range(n)) - set(thingsboard_numbers(monitoring))
    assert missing == set(range(dropped))
    logs = thingsboard_logs(monitoring)
    assert any(item["message_identifier"] == log_id for item in logs)
    gaps = [item for item in logs if item["log_subject"].startswith("gap:")]
    assert len(gaps) == 1
    # the dropped were queued in batches of 500 at T0, T0 + 500, ...
    first, last = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(T0 + t))
        for t in (0, (dropped - 1) // 500 * 500)
    )
    assert gaps[0]["log_subject"] == (
        f"gap: {dropped} data message(s) measured between {first} UTC and {last} UTC were "
        "dropped for destination monitoring by its size cap and will not arrive here"
    )
    assert gaps[0]["log_level"] == "WARNING"
    # config answers go only where configs come from
    assert not any("config_status" in item["values"] for item in monitoring.items("v1/"))
    # a row both destinations have had leaves the queue once it is archived,
    # a moment after the last acknowledgment (and the backends may still log)
    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=30, interval=0.2)
    research.close()
    monitoring.close()


def test_failover_to_the_second_address_and_back_loses_nothing(
    research_broker: Broker, tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    secondary = Broker(str(tmp_path / "secondary-broker"))
    secondary.start()
    try:
        config = two_destinations(research_broker.port, 1)
        del config["backends"]["monitoring"]
        research_section = config["backends"]["research"]
        research_section["failover"] = [{"mqtt_host": "127.0.0.1", "mqtt_port": secondary.port}]
        research_section["failover_probe_seconds"] = 1
        research_section["max_parallel_messages"] = 2
        research_section["max_payload_bytes"] = 1_024
        at_primary = Subscriber(research_broker.port, TENTA_TOPICS, client_id="primary-recorder")
        at_secondary = Subscriber(secondary.port, TENTA_TOPICS, client_id="secondary-recorder")
        agent = registered_agent(config)
        start(processes, data_dir, config, "research")

        def address_in_use() -> str:
            connection = StateInterface.load().destinations.get("research")
            return connection.broker if connection is not None and connection.connected else ""

        def received() -> set[int]:
            return set(tenta_numbers(at_primary)) | set(tenta_numbers(at_secondary))

        n = 0

        def add(count: int) -> None:
            nonlocal n
            agent.add_messages([data(i) for i in range(n, n + count)])
            n += count

        add(3_000)
        assert wait_until(lambda: len(tenta_numbers(at_primary)) >= 200, timeout=30)
        research_broker.stop()  # mid-drain
        add(1_000)
        assert wait_until(
            lambda: address_in_use() == f"127.0.0.1:{secondary.port}", timeout=60, interval=0.2
        )
        state = StateInterface.load().destinations["research"]
        assert f"failover: 127.0.0.1:{research_broker.port} did not answer" in state.detail
        assert wait_until(lambda: len(tenta_numbers(at_secondary)) >= 100, timeout=60)

        research_broker.start()
        add(1_000)
        assert wait_until(
            lambda: address_in_use() == f"127.0.0.1:{research_broker.port}",
            timeout=60,
            interval=0.2,
        )
        assert "failover" not in StateInterface.load().destinations["research"].detail
        add(500)
        assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=120, interval=0.2)
        assert wait_until(lambda: received() == set(range(n)), timeout=30, interval=0.2)
        # each broker carried part of it, and the primary again at the end
        late = set(tenta_numbers(at_primary)) & set(range(n - 500, n))
        assert tenta_numbers(at_secondary) and late
        at_primary.close()
        at_secondary.close()
    finally:
        secondary.stop()


def _station_pid(station: Station, process_name: str) -> int:
    with open(station.path("state.json")) as f:
        return int(json.load(f)["processes"][process_name]["pid"])


def test_kill_9_of_either_backend_or_the_main_loop_loses_nothing_for_either_destination(
    station: Station,
    research_broker: Broker,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monitoring_broker = Broker(str(tmp_path / "monitoring-broker"))
    monitoring_broker.start()
    try:
        config = two_destinations(
            research_broker.port,
            monitoring_broker.port,
            max_parallel_messages=1,
            max_payload_bytes=1_024,
        )
        config["backends"]["research"].update(max_parallel_messages=1, max_payload_bytes=1_024)
        config["dummy_procedure"] = None
        config["system_checks"] = None
        station.write_config(config)
        research = Subscriber(research_broker.port, TENTA_TOPICS, client_id="research-recorder")
        monitoring = Subscriber(
            monitoring_broker.port, THINGSBOARD_TOPICS, client_id="monitoring-recorder"
        )
        assert station.cli("start").returncode == 0
        point_data_paths_at(monkeypatch, station.data_dir)
        assert wait_until(
            lambda: (
                {"backend:research", "backend:monitoring"} <= set(StateInterface.load().processes)
            ),
            timeout=60,
            interval=0.2,
        )
        agent = MessagingAgent(Config.model_validate(config))
        n = 0
        backlog_at_kill: dict[str, int] = {}
        counted = {
            "research": lambda: tenta_numbers(research),
            "monitoring": lambda: thingsboard_numbers(monitoring),
        }
        for victim in ("backend:research", "backend:monitoring", "main"):
            watched = victim.removeprefix("backend:") if victim != "main" else "research"
            before = len(counted[watched]())
            agent.add_messages([data(i) for i in range(n, n + 20_000)])
            n += 20_000
            # kill once this destination's drain is under way
            assert wait_until(lambda: len(counted[watched]()) >= before + 500, timeout=60)
            backlog_at_kill[victim] = agent.get_queue_depth(watched)
            if victim == "main":
                main = psutil.Process(StateInterface.load().mainloop.pid or 0)
                children = main.children(recursive=True)
                main.send_signal(signal.SIGKILL)
                assert wait_until(lambda: not any(c.is_running() for c in children), timeout=30)
                assert station.cli("start").returncode == 0
            else:
                psutil.Process(_station_pid(station, victim)).send_signal(signal.SIGKILL)
        agent.add_messages([data(i) for i in range(n, n + 1_000)])
        n += 1_000
        assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=240, interval=0.5)
        assert wait_until(
            lambda: (
                set(tenta_numbers(research)) == set(range(n))
                and set(thingsboard_numbers(monitoring)) == set(range(n))
            ),
            timeout=60,
            interval=0.5,
        )
        print(
            f"backlog at each kill: {backlog_at_kill}; research received "
            f"{len(tenta_numbers(research))}, monitoring {len(thingsboard_numbers(monitoring))} "
            f"of {n}"
        )
        assert all(backlog > 0 for backlog in backlog_at_kill.values())  # kills mid-drain
        assert agent.get_dropped_count(destination="research") == 0
        assert agent.get_dropped_count(destination="monitoring") == 0
        status = station.status()
        assert {d for d in status["destinations"]} == {"research", "monitoring"}
        research.close()
        monitoring.close()
    finally:
        station.cli("stop")
        monitoring_broker.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answer(subscriber: Subscriber, revision: int) -> dict[str, Any] | None:
    return next(
        (
            item["values"]
            for item in subscriber.items("v1/")
            if item["values"].get("config_revision") == revision
            and item["values"].get("config_status") in ("accepted", "rejected")
        ),
        None,
    )


def home_station_config(home_port: int, seconds_between_datapoints: int) -> dict[str, Any]:
    """A station whose one ThingsBoard backend, on `home_port`, is where its
    configs come from; trials are short."""
    config = template_config_dict()
    config["general"]["system_identifier"] = STATION
    config["general"]["config_revision"] = 1
    config["dummy_procedure"]["seconds_between_datapoints"] = seconds_between_datapoints
    config["system_checks"] = None
    config["trial"] = {"deadline_seconds": 30, "stable_seconds": 2, "max_starts": 3}
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": home_port,
        "mqtt_client_id": "station-home",
    }
    return config


def push_destinations(
    home_port: int,
    at_home: Subscriber,
    config: dict[str, Any],
    revision: int,
    backends: dict[str, Any],
) -> dict[str, Any]:
    """Push `config` with these named destinations as revision `revision`
    through the home broker and return the station's final answer."""
    pushed = {**config, "general": {**config["general"], "config_revision": revision}}
    pushed["backends"] = backends
    publish(home_port, "v1/devices/me/attributes", {"configuration": signed(pushed)})
    assert wait_until(lambda: _answer(at_home, revision) is not None, timeout=120, interval=0.5)
    answer = _answer(at_home, revision)
    assert answer is not None
    return answer


def test_a_remote_config_adds_and_removes_destinations_on_trial_and_one_that_breaks_is_refused(
    station: Station, research_broker: Broker, tmp_path: Any
) -> None:
    home = Broker(str(tmp_path / "home-broker"))  # where configs come from
    home.start()
    try:
        config = home_station_config(home.port, seconds_between_datapoints=1)
        station.write_config(config)
        at_home = Subscriber(home.port, THINGSBOARD_TOPICS, client_id="home-recorder")
        research = Subscriber(research_broker.port, TENTA_TOPICS, client_id="research-recorder")
        assert station.cli("start").returncode == 0

        def push(revision: int, backends: dict[str, Any]) -> dict[str, Any]:
            return push_destinations(home.port, at_home, config, revision, backends)

        research_section = two_destinations(research_broker.port, 1)["backends"]["research"]
        # added on trial: it delivers, the config is kept
        assert push(2, {"research": research_section})["config_status"] == "accepted"
        assert wait_until(lambda: len(research.items("measurements/")) >= 5, timeout=60)
        assert set(station.status()["destinations"]) == {"backend", "research"}

        # a destination whose broker does not answer: the config is refused,
        # the previous one (with research) comes back
        broken = {**research_section, "mqtt_port": _free_port(), "mqtt_client_id": "broken"}
        answer = push(3, {"research": research_section, "broken": broken})
        assert answer["config_status"] == "rejected"
        assert "the backend of destination broken is not connected" in answer["config_reason"]
        status = station.status()
        assert status["config"]["revision"] == 2
        assert set(status["destinations"]) == {"backend", "research"}
        before = len(research.items("measurements/"))
        assert wait_until(lambda: len(research.items("measurements/")) >= before + 5, timeout=60)

        # removed while its broker is down: once the config is kept, what was
        # queued for it is released, and the queue empties
        research_broker.stop()
        assert wait_until(
            lambda: station.status()["destinations"]["research"]["backlog"] >= 10, timeout=60
        )
        assert push(4, {})["config_status"] == "accepted"
        status = station.status()
        assert set(status["destinations"]) == {"backend"}
        assert wait_until(lambda: station.status()["queue"]["depth"] <= 5, timeout=60, interval=0.5)
        at_home.close()
        research.close()
    finally:
        station.cli("stop")
        home.stop()


def test_a_destination_that_gets_only_data_is_kept_while_the_station_has_measured_nothing(
    station: Station, research_broker: Broker, tmp_path: Any
) -> None:
    """Nothing is due for it during the trial, so its broker cannot have
    acknowledged anything: connected is the proof it can give, and a good
    config must not be rejected for the station's quiet."""
    home = Broker(str(tmp_path / "home-broker"))
    home.start()
    try:
        # one data point a day, at midnight UTC: none during the trial
        config = home_station_config(home.port, seconds_between_datapoints=86_400)
        station.write_config(config)
        at_home = Subscriber(home.port, THINGSBOARD_TOPICS, client_id="home-recorder")
        assert station.cli("start").returncode == 0
        data_only = {**two_destinations(research_broker.port, 1)["backends"]["research"]}
        data_only["variants"] = ["data"]
        answer = push_destinations(home.port, at_home, config, 2, {"research": data_only})
        assert answer["config_status"] == "accepted", answer
        status = station.status()
        assert status["config"]["revision"] == 2
        assert status["destinations"]["research"]["connection"]["connected"] is True
        # idle is no excuse for a broker that is not there
        broken = {**data_only, "mqtt_port": _free_port(), "mqtt_client_id": "broken"}
        answer = push_destinations(home.port, at_home, config, 3, {"research": broken})
        assert answer["config_status"] == "rejected"
        assert "the backend of destination research is not connected" in answer["config_reason"]
        at_home.close()
    finally:
        station.cli("stop")
        home.stop()
