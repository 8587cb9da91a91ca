"""A real RabbitMQ node with its MQTT plugin on free loopback ports, private to
one test (own data dir, own epmd port, own node name), for tests and
benchmarks that must hold on more than one broker. Traffic stays on
127.0.0.1. Debian's `rabbitmq-server` provides it (`bash .ci/test` installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

from benchmarks.mosquitto import BrokerProcess, free_port

_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
_START_TIMEOUT_SECONDS = 90


def rabbitmq_available() -> bool:
    """Whether RabbitMQ is installed."""
    return os.path.exists(_SERVER)


class RabbitMQBroker(BrokerProcess):
    """One RabbitMQ node. Its data (durable sessions, retained messages)
    survives `stop()` and `start()`, like a broker restart in production."""

    def __init__(self, directory: str) -> None:
        """Write the node's config; nothing runs yet."""
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        os.makedirs(directory, exist_ok=True)
        amqp_port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        with open(os.path.join(directory, "rabbitmq.conf"), "w") as f:
            f.write(
                f"listeners.tcp.1 = 127.0.0.1:{amqp_port}\n"
                f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                "mqtt.allow_anonymous = true\n"
                "loopback_users = none\n"
            )
        with open(os.path.join(directory, "enabled_plugins"), "w") as f:
            f.write("[rabbitmq_mqtt].\n")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"ivy-test-{self.port}@localhost",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": os.path.join(directory, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(directory, "log"),
            "RABBITMQ_CONFIG_FILE": os.path.join(directory, "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(directory, "enabled_plugins"),
            "RABBITMQ_PID_FILE": os.path.join(directory, "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self) -> None:
        """Start the node and wait until its MQTT port accepts connections."""
        if not rabbitmq_available():
            raise RuntimeError("rabbitmq-server is not installed: `bash .ci/test` installs it")
        with open(os.path.join(self.directory, "console.log"), "ab") as console:
            self.process = subprocess.Popen(
                [_SERVER],
                env=self.env,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + _START_TIMEOUT_SECONDS
        while not self._accepting():
            if time.time() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"RabbitMQ did not start: {self.log()}")
            time.sleep(0.2)

    def _accepting(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """Stop the node (SIGTERM: a clean shutdown) and its epmd."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
            self.process = None
        epmd = shutil.which("epmd")
        if epmd is not None:
            subprocess.run([epmd, "-kill"], env=self.env, capture_output=True, check=False)

    def log(self) -> str:
        """The node's console output (its last lines)."""
        path = os.path.join(self.directory, "console.log")
        return open(path, errors="replace").read()[-4_000:] if os.path.exists(path) else ""
