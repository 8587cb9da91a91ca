"""A real Mosquitto broker on a free loopback port, a counting subscriber, and
test certificates. Traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import wait_until


def mosquitto_binary() -> str:
    """The broker executable; the suite fails (not skips) without it."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        pytest.fail("mosquitto is not installed: run the suite with `bash .ci/test`")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """A Mosquitto process with persistence, so that sessions and retained
    messages survive a restart on the same port."""

    def __init__(
        self,
        directory: str,
        tls: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        os.makedirs(directory, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "user root" if os.geteuid() == 0 else "",
            "persistence true",
            f"persistence_location {directory}/",
            # the default (1000) silently drops QoS 1 messages for a slow subscriber
            "max_queued_messages 0",
            "log_type error",
            "log_type warning",
            f"log_dest file {directory}/mosquitto.log",
        ]
        if users is not None:
            password_file = os.path.join(directory, "passwords")
            for i, (user, password) in enumerate(users.items()):
                subprocess.run(
                    [
                        "mosquitto_passwd",
                        "-b",
                        *(["-c"] if i == 0 else []),
                        password_file,
                        user,
                        password,
                    ],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if tls is not None:
            lines += [
                f"cafile {tls['ca']}",
                f"certfile {tls['cert']}",
                f"keyfile {tls['key']}",
            ]
        self.config_path = os.path.join(directory, "mosquitto.conf")
        with open(self.config_path, "w") as f:
            f.write("\n".join(line for line in lines if line) + "\n")

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", self.config_path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def accepting() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        assert wait_until(accepting, timeout=20), f"mosquitto did not start: {self.log()}"

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence file) and wait."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def log(self) -> str:
        """The broker's own log."""
        path = os.path.join(self.directory, "mosquitto.log")
        return open(path).read() if os.path.exists(path) else ""


class Subscriber:
    """A persistent-session QoS 1 subscriber that records every message."""

    def __init__(self, port: int, topics: list[str], client_id: str = "test-subscriber") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
        )
        self.client.reconnect_delay_set(1, 2)

        def on_connect(client: mqtt.Client, *args: Any) -> None:
            for topic in topics:
                client.subscribe(topic, qos=1)

        def on_subscribe(*args: Any) -> None:
            self.subscribed.set()

        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.messages.append((message.topic, bytes(message.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(20), "subscriber could not subscribe"

    def items(self, topic_prefix: str = "") -> list[dict[str, Any]]:
        """Every array item received so far on topics starting with the prefix."""
        with self.lock:
            received = list(self.messages)
        return [
            item
            for topic, payload in received
            if topic.startswith(topic_prefix)
            for item in json.loads(payload)
        ]

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, topic: str, payload: Any, retain: bool = False) -> None:
    """Publish one QoS 1 message from a separate client and wait for its PUBACK."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    info = client.publish(topic, json.dumps(payload).encode(), qos=1, retain=retain)
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
    """Start a broker and stop it whatever happens."""
    broker = Broker(directory, **kwargs)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def wait_for_items(subscriber: Subscriber, prefix: str, count: int, timeout: float) -> bool:
    """Wait until at least `count` items arrived on topics with the prefix."""
    return wait_until(lambda: len(subscriber.items(prefix)) >= count, timeout=timeout, interval=0.1)
