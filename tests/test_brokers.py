"""Any real broker: every connection outcome says why (once per change), topic
levels survive every broker, and secrets are masked without garbling text."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.mosquitto import Broker, free_port
from benchmarks.rabbitmq import RabbitMQBroker
from src.types import DataMessageBody
from src.utils.state_interface import StateInterface
from tests.conftest import BackendProcess, Station, template_config_dict, wait_until
from tests.mqtt_helpers import any_broker_fixture, broker_fixture, publish
from tests.test_backend import agent_for, config_dict, log_text, start_backend

pytestmark = pytest.mark.integration


@pytest.fixture
def rabbitmq(tmp_path: Any) -> Iterator[RabbitMQBroker]:
    for broker in any_broker_fixture("rabbitmq", str(tmp_path / "rabbitmq")):
        assert isinstance(broker, RabbitMQBroker)
        yield broker


def test_mqtt_5_at_a_broker_that_speaks_only_3_1_1_says_so_once(
    rabbitmq: RabbitMQBroker, data_dir: str, processes: list[BackendProcess]
) -> None:
    config = config_dict(rabbitmq.port, provider="thingsboard", mqtt_protocol="5")
    agent_for(config).add_message(DataMessageBody(data={"x": 1}))
    backend = start_backend(processes, data_dir, config)
    assert wait_until(lambda: "closed the connection before accepting it" in log_text(), 15)
    time.sleep(4)  # several retries
    lines = [line for line in log_text().splitlines() if "closed the connection" in line]
    assert len(lines) == 1, lines
    assert "MQTT 5 was tried" in lines[0] and 'mqtt_protocol to "3.1.1"' in lines[0]
    assert backend.alive()
    connection = StateInterface.load().backend_connection
    assert connection is not None and not connection.connected
    assert "MQTT 5 was tried" in connection.detail

    backend.kill()
    config["backend"]["mqtt_protocol"] = "3.1.1"
    start_backend(processes, data_dir, config)
    assert wait_until(lambda: agent_for(config).get_queue_depth() == 0, timeout=30)


def test_each_connection_failure_is_logged_once_with_its_reason(
    data_dir: str, processes: list[BackendProcess]
) -> None:
    config = config_dict(free_port())  # nothing listens there
    start_backend(processes, data_dir, config)
    assert wait_until(lambda: "cannot reach the broker" in log_text(), timeout=15)
    time.sleep(3)
    lines = [line for line in log_text().splitlines() if "cannot reach the broker" in line]
    assert len(lines) == 1 and "Connection refused" in lines[0], lines


def test_short_secrets_do_not_garble_logs_and_never_leak(
    tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker = Broker(str(tmp_path / "auth-broker"), users={"station": "right-password"})
    broker.start()
    try:
        config = config_dict(broker.port, mqtt_username="station", mqtt_password="p7q")
        agent = agent_for(config)
        agent.add_message(DataMessageBody(data={"x": 1}))
        start_backend(processes, data_dir, config)
        assert wait_until(lambda: "refused the connection" in log_text(), timeout=30)
        line = next(x for x in log_text().splitlines() if "refused the connection" in x)
        assert "*****" not in line  # "Not authorized" reads as it is
        assert "Not authorized" in line or "Bad user name or password" in line
        agent.flush_archive()
        archive = "".join(
            open(os.path.join(data_dir, "messages", name)).read()
            for name in os.listdir(os.path.join(data_dir, "messages"))
        )
        for text in (log_text(), archive):
            assert "p7q" not in text
    finally:
        broker.stop()


def test_a_message_on_an_unexpected_topic_is_logged_once(
    tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    """A persistent session keeps the subscriptions of an earlier config: after
    the station's identifier changed, configs for the old one still arrive."""
    old, new = "0b1f5a52-7c3e-4d2a-8f6b-3e9d1c2a4b5f", "5d9e2a41-0c6b-4f3e-a1d7-8e2b6c4f9a30"
    for broker in broker_fixture(str(tmp_path / "broker")):
        config = config_dict(broker.port)
        config["general"]["system_identifier"] = old
        first = start_backend(processes, data_dir, config)
        assert wait_until(lambda: "MQTT connected" in log_text(), timeout=30)
        assert first.stop() == 0
        config["general"]["system_identifier"] = new
        config["logging_verbosity"]["file_archive"] = "DEBUG"
        start_backend(processes, data_dir, config)
        assert wait_until(lambda: log_text().count("MQTT connected") == 2, timeout=30)
        for revision in (7, 8, 9):
            publish(
                broker.port, f"configurations/{old}", {"revision": revision, "configuration": {}}
            )
        assert wait_until(lambda: "unexpected topic" in log_text(), timeout=15)
        time.sleep(1)
        lines = [line for line in log_text().splitlines() if "unexpected topic" in line]
        assert len(lines) == 1 and f"configurations/{old}" in lines[0]
        assert StateInterface.load().pending == []


def test_ivy_config_check_refuses_a_dotted_identifier_and_warns_about_short_secrets(
    station: Station,
) -> None:
    config = template_config_dict()
    config["general"]["system_identifier"] = "site.1"
    station.write_config(config)
    checked = station.cli("config", "check")
    assert checked.returncode == 1
    assert "general.system_identifier: String should match" in checked.stderr
    assert '"site.1"' in checked.stderr

    config["general"]["system_identifier"] = "site-1"
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "localhost",
        "mqtt_client_id": "c",
        "mqtt_password": "p",
    }
    station.write_config(config)
    checked = station.cli("config", "check")
    assert checked.returncode == 0
    assert "shorter than 8 characters" in checked.stderr


def test_ivy_status_shows_the_broker_connection_and_why_it_fails(station: Station) -> None:
    config = template_config_dict()
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["backend"] = {
        "provider": "thingsboard",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": free_port(),
        "mqtt_client_id": "c",
        "max_drain_time": 0,  # nothing to drain to: stop at once
    }
    station.write_config(config)
    assert station.cli("start").returncode == 0

    def connection() -> dict[str, Any] | None:
        found: dict[str, Any] | None = station.status()["backend_connection"]
        return found

    assert wait_until(lambda: connection() is not None, timeout=30)
    state = connection()
    assert state is not None and not state["connected"]
    assert "cannot reach the broker" in state["detail"] and "refused" in state["detail"]
    text = station.cli("status").stdout
    assert "broker:  NOT CONNECTED (cannot reach the broker at 127.0.0.1" in text
    assert station.cli("stop").returncode == 0
