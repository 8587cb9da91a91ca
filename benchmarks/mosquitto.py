"""A real Mosquitto broker on a free loopback port, for benchmarks and tests.
Traffic stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any, TypeVar


def mosquitto_binary() -> str:
    """The broker executable; raises when it is missing (tests turn that into a
    failure, not a skip)."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed: `bash .ci/test` installs it")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_BrokerT = TypeVar("_BrokerT", bound="BrokerProcess")


class BrokerProcess:
    """What tests and benchmarks use of any broker they start: its MQTT port
    on 127.0.0.1, start, stop (data kept for the next start) and its log."""

    port: int

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop; what the broker persists survives for the next start."""
        raise NotImplementedError

    def log(self) -> str:
        """The broker's own log."""
        raise NotImplementedError

    @classmethod
    @contextlib.contextmanager
    def running(cls: type[_BrokerT], directory: str, **kwargs: Any) -> Iterator[_BrokerT]:
        """A started broker, stopped whatever happens."""
        broker = cls(directory, **kwargs)  # type: ignore[call-arg]
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


class Broker(BrokerProcess):
    """A Mosquitto process with persistence, so that sessions and retained
    messages survive a restart on the same port."""

    def __init__(
        self,
        directory: str,
        tls: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        extra_lines: tuple[str, ...] = (),
    ) -> None:
        """Write the broker's config; `extra_lines` are added as they are (an
        ACL file, a packet size limit, ...)."""
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
        lines += extra_lines
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

        deadline = time.time() + 20
        while not accepting():
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"mosquitto did not start: {self.log()}")
            time.sleep(0.05)

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
