"""What watches the station from outside: an independent MQTT recorder per
destination that records every producer message that reaches its brokers
(and runs every payload through the real servers' rules), and a sampler of the memory, open
files and queue of the station's processes."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from tests.server_rules import check_payload

from .station import STATION_IDENTIFIER, ChaosStation

Key = tuple[int, int]  # (incarnation, seq) of one producer message
THINGSBOARD_TELEMETRY = "v1/devices/me/telemetry"


class Recorder:
    """Persistent-session QoS 1 subscribers to one destination's topics, one on
    each broker address it may deliver to (a primary and its failover), that
    record every producer message and config answer as one stream."""

    def __init__(self, ports: list[int], protocol: Literal["tenta", "thingsboard"]) -> None:
        """Connect to each broker's subscriber listener and wait until subscribed."""
        self.protocol = protocol
        self.lock = threading.Lock()
        self.arrivals: dict[Key, float] = {}  # first arrival, monotonic seconds
        self.copies: Counter[Key] = Counter()
        self.acknowledgments: list[tuple[float, int, bool]] = []
        self.violations: list[str] = []
        self.subscriptions = 0
        self.clients: list[mqtt.Client] = []
        for index, port in enumerate(ports):
            subscribed = threading.Event()
            client = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=f"chaos-recorder-{protocol}-{index}",
                clean_session=False,
            )
            client.reconnect_delay_set(1, 1)
            client.on_connect = self._on_connect
            client.on_subscribe = functools.partial(self._on_subscribe, subscribed)
            client.on_message = self._on_message
            client.connect("127.0.0.1", port)
            client.loop_start()
            self.clients.append(client)
            if not subscribed.wait(20):
                raise RuntimeError(f"the {protocol} recorder could not subscribe on {port}")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        # every time: a broker that lost its persistence forgot the subscription
        if self.protocol == "thingsboard":
            client.subscribe([(THINGSBOARD_TELEMETRY, 1)])
            return
        client.subscribe(
            [(f"{topic}/{STATION_IDENTIFIER}", 1) for topic in ("measurements", "logs")]
            + [(f"acknowledgments/{STATION_IDENTIFIER}", 1)]
        )

    def _on_subscribe(self, subscribed: threading.Event, *args: Any) -> None:
        with self.lock:
            self.subscriptions += 1
        subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        payload = bytes(message.payload)
        try:
            check_payload(message.topic, payload)
        except ValueError as e:
            with self.lock:
                self.violations.append(f"{message.topic}: {e}")
        try:
            items = json.loads(payload)
        except ValueError:
            return
        with self.lock:
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict):
                    continue
                if message.topic.startswith("acknowledgments/"):
                    self.acknowledgments.append(
                        (now, int(item.get("revision", -1)), bool(item.get("success")))
                    )
                value = item.get("values" if self.protocol == "thingsboard" else "value")
                if isinstance(value, dict) and "chaos_seq" in value:
                    key = (int(value["chaos_incarnation"]), int(value["chaos_seq"]))
                    self.copies[key] += 1
                    self.arrivals.setdefault(key, now)

    def subscription_count(self) -> int:
        """How many SUBACKs arrived (one more after each reconnect)."""
        with self.lock:
            return self.subscriptions

    def accepted_at(self, revision: int) -> float | None:
        """When Tenta's acknowledgment `success: true` of `revision` arrived."""
        with self.lock:
            return next(
                (at for at, rev, success in self.acknowledgments if rev == revision and success),
                None,
            )

    def answer_count(self) -> int:
        """Acknowledgments received so far."""
        with self.lock:
            return len(self.acknowledgments)

    def close(self) -> None:
        """Disconnect."""
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


@dataclass
class Sample:
    """One look at the station."""

    at: float  # monotonic seconds
    processes: dict[str, tuple[int, float, float, float, int]] = field(default_factory=dict)
    # role -> (pid, rss MiB, pss MiB, uss MiB, open file descriptors)
    queued: int | None = None
    dropped: dict[str, int] | None = None  # destination -> data its cap dropped

    def total_pss(self) -> float:
        """PSS of all the station's processes, MiB."""
        return sum(p[2] for p in self.processes.values())


class Sampler:
    """Samples the station every `interval` seconds in a thread."""

    def __init__(self, station: ChaosStation, interval: float) -> None:
        """Start sampling."""
        self.station = station
        self.interval = interval
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sample()

    def sample(self) -> Sample:
        """Take one sample now (also called by the harness at fault times)."""
        sample = Sample(time.monotonic())
        for role, process in self.station.processes().items():
            try:
                memory = process.memory_full_info()
                sample.processes[role] = (
                    process.pid,
                    memory.rss / 2**20,
                    memory.pss / 2**20,
                    memory.uss / 2**20,
                    process.num_fds(),
                )
            except psutil.Error:
                continue
        counts = self.station.queue_counts()
        if counts is not None:
            sample.queued, sample.dropped = counts
        with self.lock:
            self.samples.append(sample)
        return sample

    def stop(self) -> list[Sample]:
        """Stop sampling; every sample taken."""
        self.stopping.set()
        self.thread.join(30)
        with self.lock:
            return list(self.samples)
