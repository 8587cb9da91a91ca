"""Real brokers (Mosquitto, RabbitMQ's MQTT plugin) on free loopback ports, a
counting subscriber, and test certificates. Traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.mosquitto import Broker, BrokerProcess
from benchmarks.rabbitmq import RabbitMQBroker
from tests.conftest import wait_until
from tests.server_rules import check_payload

# what the broker-parametrized tests need of a broker
MQTTBroker = BrokerProcess
BrokerT = TypeVar("BrokerT", bound=BrokerProcess)


class Subscriber:
    """A persistent-session QoS 1 subscriber that records every message and
    checks each against the real servers' rules (`tests.server_rules`): any
    payload a server would drop fails the test that reads it."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        client_id: str = "test-subscriber",
        ca_file: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
        )
        self.client.reconnect_delay_set(1, 2)
        if ca_file is not None:
            self.client.tls_set(ca_certs=ca_file)

        def on_connect(client: mqtt.Client, *args: Any) -> None:
            for topic in topics:
                client.subscribe(topic, qos=1)

        def on_subscribe(*args: Any) -> None:
            self.subscribed.set()

        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            payload = bytes(message.payload)
            try:
                check_payload(message.topic, payload)
            except ValueError as e:
                with self.lock:
                    self.violations.append(f"{message.topic}: {e}")
            with self.lock:
                self.messages.append((message.topic, payload))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("localhost" if ca_file else "127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(20), "subscriber could not subscribe"

    def assert_conforming(self) -> None:
        """Fail if a real server would have dropped any payload received."""
        with self.lock:
            assert not self.violations, "\n".join(self.violations[:5])

    def items(self, topic_prefix: str = "") -> list[dict[str, Any]]:
        """Every array item received so far on topics starting with the prefix."""
        self.assert_conforming()
        with self.lock:
            received = list(self.messages)
        return [
            item
            for topic, payload in received
            if topic.startswith(topic_prefix)
            for item in json.loads(payload)
        ]

    def close(self) -> None:
        """Disconnect; fail if anything received breaks the servers' rules."""
        self.client.disconnect()
        self.client.loop_stop()
        self.assert_conforming()


def publish(port: int, topic: str, payload: Any, retain: bool = False) -> None:
    """Publish one QoS 1 message from a separate client and wait for its PUBACK;
    bytes go out as they are, anything else as JSON."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    info = client.publish(topic, raw, qos=1, retain=retain)
    info.wait_for_publish(timeout=20)
    client.disconnect()
    client.loop_stop()


def make_certificates(directory: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost, made by openssl
    (argument lists only)."""
    os.makedirs(directory, exist_ok=True)
    path = {
        name: os.path.join(directory, name)
        for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "server.ext")
    }

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        path["ca.key"],
        "-out",
        path["ca.crt"],
        "-subj",
        "/CN=ivy-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        path["server.key"],
        "-out",
        path["server.csr"],
        "-subj",
        "/CN=localhost",
    )
    with open(path["server.ext"], "w") as f:
        f.write(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
    openssl(
        "x509",
        "-req",
        "-in",
        path["server.csr"],
        "-CA",
        path["ca.crt"],
        "-CAkey",
        path["ca.key"],
        "-CAcreateserial",
        "-out",
        path["server.crt"],
        "-days",
        "2",
        "-extfile",
        path["server.ext"],
    )
    for name in ("ca.crt", "server.crt", "server.key"):
        os.chmod(path[name], 0o644)
    return {"ca": path["ca.crt"], "cert": path["server.crt"], "key": path["server.key"]}


def broker_fixture(directory: str, **kwargs: Any) -> Iterator[Broker]:
    """A started Mosquitto (see `Broker` for the options)."""
    yield from _started(Broker(directory, **kwargs))


def _started(broker: BrokerT) -> Iterator[BrokerT]:
    """Start a broker and stop it whatever happens; one that cannot start is a
    failure, not a skip."""
    try:
        broker.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield broker
    finally:
        broker.stop()


def wait_for_items(subscriber: Subscriber, prefix: str, count: int, timeout: float) -> bool:
    """Wait until at least `count` items arrived on topics with the prefix."""
    return wait_until(lambda: len(subscriber.items(prefix)) >= count, timeout=timeout, interval=0.1)


def any_broker_fixture(kind: str, directory: str) -> Iterator[BrokerProcess]:
    """A started Mosquitto or RabbitMQ (MQTT plugin) for the tests that run on
    both."""
    broker = Broker(directory) if kind == "mosquitto" else RabbitMQBroker(directory)
    yield from _started(broker)
