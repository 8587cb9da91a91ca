"""The MQTT backends against a real Mosquitto: delivery, payload shapes,
outages, crashes, TLS, logins and configs. Every test counts messages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from src.types import Config, ConfigMessageBody, DataMessageBody, LogMessageBody
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from tests.conftest import (
    BackendProcess,
    Station,
    signed,
    template_config_dict,
    wait_until,
)
from tests.mqtt_helpers import (
    MQTTBroker,
    Subscriber,
    any_broker_fixture,
    broker_fixture,
    make_certificates,
    publish,
    wait_for_items,
)

pytestmark = pytest.mark.integration

STATION = "8c4f4b5e-2f36-4d3b-9c41-6a1f0e2b7d90"  # Tenta's topic id is the sensor's UUID
TENTA_TOPICS = [f"measurements/{STATION}", f"logs/{STATION}", f"acknowledgments/{STATION}"]


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Broker]:
    yield from broker_fixture(str(tmp_path / "broker"))


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[MQTTBroker]:
    """The broker-specific tests run on Mosquitto and on RabbitMQ's MQTT plugin."""
    yield from any_broker_fixture(request.param, str(tmp_path / "broker"))


def config_dict(port: int, provider: str = "tenta", **backend: Any) -> dict[str, Any]:
    config = template_config_dict()
    config["general"]["system_identifier"] = STATION
    config["general"]["config_revision"] = 3
    config["backend"] = {
        "provider": provider,
        "mqtt_host": "127.0.0.1",
        "mqtt_port": port,
        "mqtt_client_id": f"ivy-{provider}",
        "max_drain_time": 30,
        **backend,
    }
    return config


def start_backend(
    processes: list[BackendProcess], data_dir: str, config: dict[str, Any]
) -> BackendProcess:
    process = BackendProcess(data_dir, config)
    process.start()
    processes.append(process)
    return process


def agent_for(config: dict[str, Any]) -> MessagingAgent:
    return MessagingAgent(Config.model_validate(config))


def log_text() -> str:
    return Logger.read_current_log_file() or ""


def sequence_numbers(items: list[dict[str, Any]]) -> list[int]:
    """The `i` of each Tenta measurement: Tenta items carry no identifier, so
    tests count messages by a sequence number in the data."""
    return [item["value"]["i"] for item in items]


def queued_sequence_numbers(agent: MessagingAgent) -> set[int]:
    return {
        json.loads(row.body)["data"]["i"]
        for row in agent.get_oldest_rows(1_000_000)
        if row.variant == "data"
    }


# --- delivery and payload shapes ------------------------------------------------


def test_tenta_delivers_everything_in_order_with_the_documented_shape(
    any_broker: MQTTBroker, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = any_broker
    config = config_dict(broker.port, max_payload_bytes=4_000)
    agent = agent_for(config)
    subscriber = Subscriber(broker.port, TENTA_TOPICS)
    n = 1_000
    measured_at = 1_700_000_000.25
    agent.add_messages(
        [DataMessageBody(data={"i": i, "co2": i + 0.5}) for i in range(n)], measured_at
    )
    agent.add_message(DataMessageBody(data={"i": n, "t": 1.5, "sensor": "A1"}), measured_at)
    agent.add_message(LogMessageBody(level="WARNING", subject="fan", body="slow"), measured_at)
    agent.add_message(
        ConfigMessageBody(status="accepted", config_revision=4, software_version="0.1.0"),
        measured_at,
    )
    agent.add_message(
        ConfigMessageBody(
            status="rejected", config_revision=5, software_version="0.1.0", reason="x: bad"
        ),
        measured_at,
    )
    start_backend(processes, data_dir, config)

    assert wait_for_items(subscriber, "measurements/", n + 1, timeout=60)
    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=30)
    measurements = subscriber.items(f"measurements/{STATION}")
    assert sequence_numbers(measurements) == list(range(n + 1))  # all, in order
    assert measurements[0] == {  # exactly Tenta's keys: the measurement's own time
        "value": {"i": 0, "co2": 0.5},
        "timestamp": measured_at,
        "revision": 3,
    }
    assert measurements[-1]["value"] == {"i": n, "t": 1.5}  # strings went to the logs

    assert wait_for_items(subscriber, "logs/", 4, timeout=30)
    logs = subscriber.items(f"logs/{STATION}")
    assert {
        "message": "sensor: A1",
        "severity": "info",
        "timestamp": measured_at,
        "revision": 3,
    } in logs
    assert any(log["severity"] == "warning" and log["message"] == "fan\nslow" for log in logs)
    assert any(log["severity"] == "error" and "x: bad" in log["message"] for log in logs)
    assert wait_for_items(subscriber, "acknowledgments/", 2, timeout=30)
    assert subscriber.items(f"acknowledgments/{STATION}") == [
        {"success": True, "timestamp": measured_at, "revision": 4},
        {"success": False, "timestamp": measured_at, "revision": 5},
    ]
    # bounded payloads: many publishes, each within max_payload_bytes
    with subscriber.lock:
        sizes = [
            len(payload)
            for topic, payload in subscriber.messages
            if topic.startswith("measurements/")
        ]
    assert len(sizes) > 10 and max(sizes) <= 4_000
    subscriber.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_thingsboard_delivers_telemetry_arrays(
    broker: Broker, data_dir: str, processes: list[BackendProcess], protocol: str
) -> None:
    config = config_dict(broker.port, provider="thingsboard", mqtt_protocol=protocol)
    agent = agent_for(config)
    subscriber = Subscriber(broker.port, ["v1/devices/me/telemetry"])
    ids = agent.add_messages(
        [DataMessageBody(data={"co2": float(i), "s": "ok"}) for i in range(500)], 1_700_000_000.5
    )
    log_id = agent.add_message(
        LogMessageBody(level="ERROR", subject="s", body="b"), 1_700_000_001.0
    )
    ack_id = agent.add_message(
        ConfigMessageBody(
            status="rejected", config_revision=7, software_version="0.1.0", reason="r"
        ),
        1_700_000_002.0,
    )
    start_backend(processes, data_dir, config)
    assert wait_for_items(subscriber, "v1/", 502, timeout=60)
    items = subscriber.items("v1/devices/me/telemetry")
    # the log and the config answer go before the data backlog
    assert [i["values"]["message_identifier"] for i in items] == [log_id, ack_id, *ids]
    log_item, ack_item, items = items[0], items[1], items[2:]
    assert items[0] == {
        "ts": 1_700_000_000_500,
        "values": {"co2": 0.0, "s": "ok", "message_identifier": ids[0]},
    }
    assert log_item["values"] == {
        "log_level": "ERROR",
        "log_subject": "s",
        "log_body": "b",
        "message_identifier": log_id,
    }
    assert ack_item["values"]["config_status"] == "rejected"
    assert ack_item["values"]["config_revision"] == 7 and ack_item["values"]["config_reason"] == "r"
    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=30)
    subscriber.close()


# --- outages and crashes ---------------------------------------------------------


def test_broker_outage_loses_nothing(
    any_broker: MQTTBroker, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = any_broker
    config = config_dict(broker.port)
    agent = agent_for(config)
    subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="outage-subscriber")
    start_backend(processes, data_dir, config)
    produced: list[int] = []
    for i in range(40):  # a stream: 40 batches of 50 while the broker goes away and back
        batch = [i * 50 + j for j in range(50)]
        agent.add_messages([DataMessageBody(data={"i": k}) for k in batch])
        produced += batch
        if i == 10:
            broker.stop()
            time.sleep(1.0)
            # nothing was deleted without its PUBACK: every message is either
            # still queued or was received
            received = set(sequence_numbers(subscriber.items("measurements/")))
            assert set(produced) <= queued_sequence_numbers(agent) | received
        if i == 25:
            broker.start()
        time.sleep(0.1)
    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=90, interval=0.2), broker.log()
    assert wait_for_items(subscriber, "measurements/", len(set(produced)), timeout=60)
    received_ids = sequence_numbers(subscriber.items("measurements/"))
    missing = set(produced) - set(received_ids)
    duplicates = len(received_ids) - len(set(received_ids))
    print(f"produced {len(produced)}, received {len(received_ids)} ({duplicates} duplicates)")
    assert missing == set()
    assert log_text().count("lost the connection") <= 1
    subscriber.close()


def test_backend_killed_mid_drain_loses_nothing(
    any_broker: MQTTBroker, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = any_broker
    config = config_dict(broker.port, max_parallel_messages=1, max_payload_bytes=1_024)
    agent = agent_for(config)
    subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="crash-subscriber")
    n = 20_000
    agent.add_messages([DataMessageBody(data={"i": i}) for i in range(n)])
    first = start_backend(processes, data_dir, config)
    assert wait_for_items(subscriber, "measurements/", 200, timeout=60)
    first.kill()
    queued_at_kill = agent.get_queue_depth()
    delivered_before_restart = len(subscriber.items("measurements/"))
    start_backend(processes, data_dir, config)
    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=120, interval=0.2)
    assert wait_for_items(subscriber, "measurements/", n, timeout=60)
    received = sequence_numbers(subscriber.items("measurements/"))
    duplicates = len(received) - len(set(received))
    print(
        f"killed with {queued_at_kill} queued after {delivered_before_restart} delivered; "
        f"{len(received)} received, {duplicates} duplicates"
    )
    assert set(received) == set(range(n))
    assert queued_at_kill > 0  # the kill did land in the middle
    subscriber.close()


def test_the_cap_drops_exactly_what_the_broker_never_got_across_a_backend_crash(
    broker: Broker, data_dir: str, processes: list[BackendProcess]
) -> None:
    # the chaos soak: rows the broker had got were still queued at a kill -9
    # (their PUBACKs unread), the cap then dropped them, and the station
    # counted them as never delivered
    config = config_dict(broker.port, max_payload_bytes=1_024)
    config["storage"] = {"max_queued_messages": 10_000}
    agent = agent_for(config)
    subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="cap-subscriber")
    agent.add_messages([DataMessageBody(data={"i": i}) for i in range(10_000)])
    delivered_but_queued: set[int] = set()
    for _ in range(5):  # until a kill lands between a PUBACK and its deletion
        backend = start_backend(processes, data_dir, config)
        got = len(subscriber.items("measurements/"))
        assert wait_for_items(subscriber, "measurements/", got + 500, timeout=60)
        backend.kill()
        time.sleep(0.5)  # what the broker got has reached the subscriber
        delivered_but_queued = queued_sequence_numbers(agent) & set(
            sequence_numbers(subscriber.items("measurements/"))
        )
        if delivered_but_queued:
            break
    n = 25_000
    for start in range(10_000, n, 1_000):  # the cap drops while no backend runs
        agent.add_messages([DataMessageBody(data={"i": i}) for i in range(start, start + 1_000)])
    start_backend(processes, data_dir, config)
    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=120, interval=0.2)
    assert wait_for_items(subscriber, "measurements/", n - agent.get_dropped_count(), timeout=60)
    time.sleep(1.0)  # nothing more is on its way
    missing = set(range(n)) - set(sequence_numbers(subscriber.items("measurements/")))
    print(
        f"{len(delivered_but_queued)} delivered but still queued at the kill; "
        f"dropped {agent.get_dropped_count()}, missing {len(missing)}"
    )
    assert delivered_but_queued  # the kill landed between a PUBACK and its deletion
    assert agent.get_dropped_count() > 0
    assert len(missing) == agent.get_dropped_count()
    assert missing == set(range(min(missing), max(missing) + 1))  # the oldest unsent
    subscriber.close()


# --- TLS and logins --------------------------------------------------------------


def test_tls_works_with_the_ca_and_is_refused_without(
    tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    certificates = make_certificates(str(tmp_path / "certs"))
    broker = Broker(str(tmp_path / "tls-broker"), tls=certificates)
    broker.start()
    try:
        agent = agent_for(config_dict(broker.port))
        agent.add_messages([DataMessageBody(data={"i": i}) for i in range(20)])
        subscriber = Subscriber(
            broker.port, TENTA_TOPICS, client_id="tls-subscriber", ca_file=certificates["ca"]
        )
        without_ca = start_backend(processes, data_dir, config_dict(broker.port, tls={}))
        assert wait_until(lambda: "cannot reach the broker" in log_text(), timeout=30)
        assert "CERTIFICATE_VERIFY_FAILED" in log_text()  # the reason, for the operator
        time.sleep(2)
        data_rows = [r for r in agent.get_oldest_rows(1_000) if r.variant == "data"]
        assert len(data_rows) == 20  # nothing went out over an unverified link
        assert without_ca.alive()
        without_ca.kill()

        with_ca = start_backend(
            processes, data_dir, config_dict(broker.port, tls={"ca_file": certificates["ca"]})
        )
        assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=60)
        assert with_ca.stop() == 0
        assert set(sequence_numbers(subscriber.items("measurements/"))) == set(range(20))
        subscriber.close()
    finally:
        broker.stop()


def test_wrong_password_is_logged_once_and_retried(
    tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = Broker(str(tmp_path / "auth-broker"), users={"station": "right-password"})
    broker.start()
    try:
        config = config_dict(
            broker.port, mqtt_username="station", mqtt_password="wrong-password-123"
        )
        agent = agent_for(config)
        agent.add_message(DataMessageBody(data={"x": 1}))
        wrong = start_backend(processes, data_dir, config)
        assert wait_until(lambda: "refused the connection" in log_text(), timeout=30)
        time.sleep(4)  # several retries with backoff (1 s, 2 s, ...)
        assert wrong.alive()
        assert log_text().count("refused the connection") == 1
        assert "Not authorized" in log_text() or "Bad user name or password" in log_text()
        assert "wrong-password-123" not in log_text()
        assert [r.variant for r in agent.get_oldest_rows(100)].count("data") == 1
        wrong.kill()

        config["backend"]["mqtt_password"] = "right-password"
        right = start_backend(processes, data_dir, config)
        assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=30)
        right.stop()
    finally:
        broker.stop()


# --- configs ---------------------------------------------------------------------


def pending_revisions() -> list[int]:
    return [p.config.general.config_revision for p in StateInterface.load().pending]


def station_config(**general: Any) -> dict[str, Any]:
    """A config for this station (signed configs name the stations they are for)."""
    config = template_config_dict()
    config["general"].update(system_identifier=STATION, **general)
    return config


def config_answers(agent: MessagingAgent) -> list[dict[str, Any]]:
    return [
        m.body.model_dump()
        for m in agent.get_n_latest_messages(10_000)
        if m.body.variant == "config"
    ]


def test_tenta_configs_retained_invalid_replayed_unsigned_and_duplicate(
    any_broker: MQTTBroker, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = any_broker
    config = config_dict(broker.port)
    topic = f"configurations/{STATION}"
    with StateInterface.update() as state:  # the station handled a config signed at 1000 s
        state.newest_signed_config_at = 1_000.0
    new_config = json.loads(signed(station_config()))
    publish(broker.port, topic, {"revision": 10, "configuration": new_config}, retain=True)
    start_backend(processes, data_dir, config)
    assert wait_until(lambda: pending_revisions() == [10], timeout=30)  # retained, before connect

    publish(broker.port, topic, {"revision": 10, "configuration": new_config})  # duplicate
    replayed = json.loads(signed(station_config(), now=900.0))  # signed before the newest
    publish(broker.port, topic, {"revision": 12, "configuration": replayed})
    publish(broker.port, topic, {"revision": 13, "configuration": station_config()})  # unsigned
    bad = station_config(software_version="one.two")
    publish(broker.port, topic, {"revision": 11, "configuration": json.loads(signed(bad))})
    agent = agent_for(config)
    subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="config-subscriber")
    assert wait_for_items(subscriber, "acknowledgments/", 1, timeout=30)
    # only the verified (if invalid) config is acknowledged by revision: nobody
    # else can plant Tenta's one acknowledgment of a revision
    ack = subscriber.items("acknowledgments/")[0]
    assert ack["revision"] == 11 and ack["success"] is False

    def logged(text: str) -> bool:
        return any(text in item["message"] for item in subscriber.items("logs/"))

    assert wait_until(lambda: logged("general.software_version"), timeout=30)
    assert wait_until(lambda: logged("a config claiming revision 12 was not accepted"), 30)
    assert logged("replayed: signed at 1970-01-01 00:15:00 UTC")
    assert wait_until(lambda: logged("a config claiming revision 13 was not accepted"), 30)
    assert logged("unsigned: this station takes only configs signed by a key")
    assert len(subscriber.items("acknowledgments/")) == 1
    assert pending_revisions() == [10]
    publish(broker.port, topic, "not an envelope")
    assert wait_until(lambda: logged("expected a JSON object"), timeout=30)
    assert pending_revisions() == [10]
    state = StateInterface.load()
    assert state.rejected_config_revisions == [] and state.highest_handled_config_revision is None
    assert agent.get_queue_depth() == 0 or wait_until(
        lambda: agent.get_queue_depth() == 0, timeout=30
    )
    subscriber.close()


def test_a_fresh_tenta_station_accepts_revision_0(
    broker: Broker, data_dir: str, processes: list[BackendProcess]
) -> None:
    """Tenta numbers a sensor's first configuration 0: a station that has
    handled no remote config must not ignore it as "not newer"."""
    config = config_dict(broker.port)
    config["general"]["config_revision"] = 0  # as in the template
    publish(
        broker.port,
        f"configurations/{STATION}",
        {"revision": 0, "configuration": json.loads(signed(station_config()))},
        retain=True,
    )
    start_backend(processes, data_dir, config)
    assert wait_until(lambda: pending_revisions() == [0], timeout=30)


def test_thingsboard_config_requested_at_connect_and_pushed(
    any_broker: MQTTBroker, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = any_broker
    config = config_dict(broker.port, provider="thingsboard")
    shared = json.loads(signed(station_config(config_revision=20)))

    # a stand-in for ThingsBoard's server side: answer attribute requests
    server = Subscriber(broker.port, ["v1/devices/me/attributes/request/+"], client_id="tb-server")
    answers = Subscriber(broker.port, ["v1/devices/me/telemetry"], client_id="tb-answers")

    def answer_requests() -> bool:
        with server.lock:
            requests = [t for t, _ in server.messages]
            server.messages.clear()
        for request_topic in requests:
            number = request_topic.rsplit("/", 1)[1]
            publish(
                broker.port,
                f"v1/devices/me/attributes/response/{number}",
                {"shared": {"configuration": shared}},
            )
        return bool(requests)

    start_backend(processes, data_dir, config)
    assert wait_until(answer_requests, timeout=30)
    assert wait_until(lambda: pending_revisions() == [20], timeout=30)

    pushed = signed(station_config(config_revision=21))  # the attribute as a JSON string
    publish(broker.port, "v1/devices/me/attributes", {"configuration": pushed})
    assert wait_until(lambda: pending_revisions() == [20, 21], timeout=30)

    broken = {"general": {"config_revision": 22, "system_identifier": STATION}}
    publish(broker.port, "v1/devices/me/attributes", {"configuration": json.loads(signed(broken))})

    def rejections() -> list[dict[str, Any]]:
        return [
            item["values"]
            for item in answers.items("v1/devices/me/telemetry")
            if item["values"].get("config_status") == "rejected"
        ]

    assert wait_until(lambda: len(rejections()) == 1, timeout=30)
    assert "general.software_version: Field required" in rejections()[0]["config_reason"]
    assert rejections()[0]["config_revision"] == 22
    publish(broker.port, "v1/devices/me/attributes", {"other_attribute": 1})
    time.sleep(0.5)
    assert pending_revisions() == [20, 21]
    server.close()


def test_ivy_stop_drains_the_queue_through_a_live_broker(broker: Broker, station: Station) -> None:
    """The whole station: 10,000 messages queued, `ivy start`, `ivy stop` at
    once; procedures stop first, the backend drains everything, then stops."""
    config = config_dict(broker.port, max_drain_time=60)
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    station.write_config(config)
    agent = MessagingAgent(
        Config.model_validate(config),
        station.path("active-message-queue.sqlite3"),
        station.path("messages"),
    )
    agent.add_messages([DataMessageBody(data={"i": i}) for i in range(10_000)])
    subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="drain-subscriber")
    started = station.cli("start")
    assert started.returncode == 0, started.stderr
    stopped = station.cli("stop", timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    assert station.processes() == []
    assert agent.get_queue_depth() == 0
    assert wait_for_items(subscriber, "measurements/", 10_000, timeout=30)
    measurements = subscriber.items("measurements/")
    received = {m["value"]["i"] for m in measurements if "i" in m["value"]}
    assert received == set(range(10_000))
    subscriber.close()
