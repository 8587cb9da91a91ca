"""Rows a real broker will not take must not stall the queue: an MQTT 5 refusal
(an ACL denying one topic) and a broker that closes the connection whenever a
payload is too large (Mosquitto's max_packet_size). The other rows arrive, the
poison row goes out once as an error holding its raw content, and it is
counted."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from src.types import ConfigMessageBody, DataMessageBody, LogMessageBody
from tests.conftest import BackendProcess, wait_until
from tests.mqtt_helpers import Subscriber, broker_fixture, wait_for_items
from tests.test_backend import (
    STATION,
    TENTA_TOPICS,
    agent_for,
    config_dict,
    log_text,
    sequence_numbers,
    start_backend,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def acl_broker(tmp_path: Any) -> Iterator[Broker]:
    """Stations may publish measurements and logs, not acknowledgments."""
    acl = tmp_path / "acl"
    acl.write_text("topic read #\ntopic write measurements/#\ntopic write logs/#\n")
    yield from broker_fixture(str(tmp_path / "acl-broker"), extra_lines=(f"acl_file {acl}",))


def error_logs(subscriber: Subscriber) -> list[str]:
    return [
        item["message"]
        for item in subscriber.items(f"logs/{STATION}")
        if item["severity"] == "error"
    ]


def test_a_refused_row_is_isolated_and_sent_once_as_an_error(
    acl_broker: Broker, data_dir: str, processes: list[BackendProcess]
) -> None:
    config = config_dict(acl_broker.port, mqtt_protocol="5")
    agent = agent_for(config)
    subscriber = Subscriber(acl_broker.port, TENTA_TOPICS, client_id="poison-subscriber")
    agent.add_messages([DataMessageBody(data={"i": i}) for i in range(500)])
    agent.add_message(
        ConfigMessageBody(status="accepted", config_revision=4, software_version="0.1.0")
    )
    agent.add_messages([DataMessageBody(data={"i": i}) for i in range(500, 1_000)])
    start_backend(processes, data_dir, config)

    assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=60), log_text()
    assert wait_for_items(subscriber, "measurements/", 1_000, timeout=30)
    assert sorted(set(sequence_numbers(subscriber.items("measurements/")))) == list(range(1_000))
    assert wait_until(lambda: len(error_logs(subscriber)) >= 1, timeout=30)
    # once (the backend's own error log line about it goes out too)
    (error,) = [e for e in error_logs(subscriber) if e.startswith("unreadable queued message")]
    assert "the broker refused it: Not authorized" in error
    assert '"status":"accepted"' in error  # the raw content
    assert subscriber.items("acknowledgments/") == []
    assert agent.get_poisoned_count() == 1
    assert "poison row" in log_text()
    subscriber.close()


def test_a_row_that_makes_the_broker_hang_up_is_isolated(
    tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    broker_dir = str(tmp_path / "small-broker")
    with Broker.running(broker_dir, extra_lines=("max_packet_size 3000",)) as broker:
        # the station's bound is far above the broker's: batches make it hang up
        config = config_dict(broker.port, max_payload_bytes=64_000)
        agent = agent_for(config)
        subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="hangup-subscriber")
        agent.add_messages([DataMessageBody(data={"i": i}) for i in range(300)])
        agent.add_message(LogMessageBody(level="ERROR", subject="big", body="x" * 5_000))
        agent.add_messages([DataMessageBody(data={"i": i}) for i in range(300, 600)])
        start_backend(processes, data_dir, config)

        assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=120), log_text()
        assert wait_for_items(subscriber, "measurements/", 600, timeout=30)
        assert sorted(set(sequence_numbers(subscriber.items("measurements/")))) == list(range(600))
        assert wait_until(lambda: len(error_logs(subscriber)) >= 7, timeout=30)
        joined = "".join(error_logs(subscriber))
        assert "the broker closed the connection each time it was sent" in joined
        assert joined.count("x") >= 5_000  # the raw content, in parts
        assert agent.get_poisoned_count() == 1
        assert "looking for a poison row" in log_text()
        subscriber.close()


class FlakyLink:
    """A TCP relay to a broker that, for its first `bad` connections, passes
    what the station sends but nothing back after the first reply (the
    CONNACK), and cuts the connection `cut_after` seconds in: a link that
    stalls, as a mobile one does, not a broker that refuses a row."""

    def __init__(self, broker_port: int, bad: int, cut_after: float) -> None:
        self.broker_port = broker_port
        self.bad = bad
        self.cut_after = cut_after
        self.connections = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = int(self.server.getsockname()[1])
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=10)
        self.server.close()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            flaky = self.connections < self.bad
            self.connections += 1
            threading.Thread(target=self._relay, args=(client, flaky), daemon=True).start()

    def _relay(self, client: socket.socket, flaky: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.broker_port))
        started, replies = time.monotonic(), 0
        try:
            while self.running and not (flaky and time.monotonic() - started > self.cut_after):
                readable, _, _ = select.select([client, upstream], [], [], 0.1)
                for side in readable:
                    data = side.recv(65_536)
                    if not data:
                        return
                    if side is client:
                        upstream.sendall(data)
                    elif not flaky or replies == 0:
                        replies += 1
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


def test_a_link_that_keeps_failing_makes_no_row_poison(
    tmp_path: Any, data_dir: str, processes: list[BackendProcess]
) -> None:
    # seven connections in a row that take the rows and lose the answers, cut
    # 5 s in (far from the 2 s that make a drop prompt, even on a loaded
    # machine): late drops count a third of a prompt one (six such drops
    # once made two good rows poison and dropped them)
    with Broker.running(str(tmp_path / "broker")) as broker:
        link = FlakyLink(broker.port, bad=7, cut_after=5.0)
        try:
            config = config_dict(link.port, reconnect_max_seconds=1)
            config["logging_verbosity"]["message_sending"] = None
            agent = agent_for(config)
            subscriber = Subscriber(broker.port, TENTA_TOPICS, client_id="link-subscriber")
            agent.add_messages([DataMessageBody(data={"i": i}) for i in range(5)])
            start_backend(processes, data_dir, config)

            assert wait_until(lambda: link.connections > 7, timeout=120), log_text()
            assert wait_until(lambda: agent.get_queue_depth() == 0, timeout=60), log_text()
            assert agent.get_poisoned_count() == 0
            assert set(sequence_numbers(subscriber.items("measurements/"))) == set(range(5))
            assert error_logs(subscriber) == []
            subscriber.close()
        finally:
            link.close()
