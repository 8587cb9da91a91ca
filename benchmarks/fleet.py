"""Benchmark `fleet` (documented, not in CI; `python -m benchmarks fleet`):
N real stations (50; 5 with --quick), each a main loop, a dummy procedure
measuring once a second and a Tenta backend, on one Mosquitto on this
machine, and `ivy fleet` as an operator runs it.

- A rollout of a config change to all of them in waves (1, 10%, 100%):
  time until every station accepted, side by side with the same change to
  all at once (one wave); p50 and p95 of each station's time from send to
  its `accepted` (which includes its trial's stable_seconds).
- A broker restart (a 10 s outage) with all of them connected: the share of
  stations saying online again in the busiest second, side by side with as
  many raw paho clients; the time until every station's backlog is drained
  again; and, once the stations are stopped, the data messages they
  archived that never reached the broker, fleet-wide (should be 0).
- Per-station broker load in steady state (what a subscriber to `#` sees per
  station: messages and bytes per second), to size a broker for 10,000."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from src import constants

from .common import Figure
from .destinations import OUTAGE_S, busiest_second_share, raw_clients_reconnect
from .mosquitto import Broker
from .signing import make_signer, trust_station

_STEADY_STATE_S = 30.0
_STABLE_SECONDS = 2


def _uuid(index: int) -> str:
    return f"{index:08x}-0000-4000-8000-{index:012x}"


class _Station:
    """One station copy (its own project, data dir and root)."""

    def __init__(self, directory: str, index: int, port: int, signer_public: Any) -> None:
        self.identifier = _uuid(index)
        self.project = os.path.join(directory, "project")
        os.makedirs(os.path.join(self.project, "config"))
        for name in ("run.py", "cli.py", "pyproject.toml"):
            shutil.copy(os.path.join(constants.PROJECT_DIR, name), self.project)
        shutil.copytree(
            os.path.join(constants.PROJECT_DIR, "src"),
            os.path.join(self.project, "src"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        with open(os.path.join(constants.PROJECT_DIR, "config", "config.template.json")) as f:
            config = json.load(f)
        config["general"]["system_identifier"] = self.identifier
        config["general"]["config_revision"] = 1
        config["dummy_procedure"]["seconds_between_datapoints"] = 1
        config["system_checks"] = None
        config["trial"] = {
            "deadline_seconds": 120,
            "stable_seconds": _STABLE_SECONDS,
            "max_starts": 3,
        }
        config["backend"] = {
            "provider": "tenta",
            "mqtt_host": "127.0.0.1",
            "mqtt_port": port,
            "mqtt_client_id": f"station-{index}",
            "reconnect_max_seconds": 8,
            "max_drain_time": 20,
        }
        with open(os.path.join(self.project, "config", "config.json"), "w") as f:
            json.dump(config, f)
        self.data = os.path.join(directory, "data")
        self.env = {
            **os.environ,
            "IVY_ROOT_DIR": os.path.join(directory, "root"),
            "IVY_DATA_DIR": self.data,
        }
        trust_station(self.env["IVY_ROOT_DIR"], [signer_public])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, os.path.join(self.project, "cli.py"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def queued(self) -> int:
        """Rows still queued (every row leaves once the broker has it)."""
        path = os.path.join(self.data, "active-message-queue.sqlite3")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            (count,) = db.execute("SELECT count(*) FROM queue").fetchone()
        return int(count)

    def archived_data_timestamps(self) -> set[float]:
        found: set[float] = set()
        directory = os.path.join(self.data, "messages")
        for name in os.listdir(directory):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    try:
                        item = json.loads(line)
                    except ValueError:
                        continue
                    if item["body"].get("variant") == "data":
                        found.add(round(float(item["timestamp"]), 3))
        return found


class _Tap:
    """A subscriber to `#`: counts messages and bytes per topic kind, the
    measurement timestamps per station, and presence `online` moments."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.messages = 0
        self.bytes = 0
        self.measured: dict[str, set[float]] = {}
        self.online_at: dict[str, float] = {}
        # a persistent session: what arrives while the tap reconnects after
        # the broker's restart is kept for it
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="tap", clean_session=False
        )
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        parts = message.topic.split("/")
        with self.lock:
            self.messages += 1
            self.bytes += len(payload) + len(message.topic)
            if parts[0] == "measurements":
                stamps = self.measured.setdefault(parts[1], set())
                for item in json.loads(payload):
                    stamps.add(round(float(item["timestamp"]), 3))
            elif parts[0] == "ivy" and parts[2] == "presence" and not message.retain:
                body = json.loads(payload)
                if body.get("online"):
                    self.online_at[parts[1]] = float(body.get("at", time.time()))

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.messages, self.bytes

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, os.path.join(constants.PROJECT_DIR, "cli.py"), "fleet", *args],
        capture_output=True,
        text=True,
        timeout=3_600,
        check=False,
    )


def _rollout(
    directory: str, inventory: str, key: str, value: int, waves: str
) -> tuple[float, list[float]]:
    """Roll `seconds_between_datapoints = value` out; (seconds until all
    accepted, each station's seconds from send to accepted)."""
    change = os.path.join(directory, f"change-{value}.json")
    with open(change, "w") as f:
        json.dump({"dummy_procedure": {"seconds_between_datapoints": value}}, f)
    store = os.path.join(directory, "fleet.sqlite3")
    started = time.monotonic()
    result = _fleet(
        "rollout", change, "--inventory", inventory, "--key", key, "--waves", waves,
        "--store", store, "--json",
    )  # fmt: skip
    took = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"rollout failed: {result.stdout}\n{result.stderr[-2000:]}")
    with sqlite3.connect(store) as db:
        per_station = [
            float(answered - sent)
            for sent, answered in db.execute(
                "SELECT sent_at, answered_at FROM targets "
                "WHERE rollout = (SELECT max(id) FROM rollouts) AND status = 'accepted'"
            )
        ]
    return took, per_station


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(quick: bool) -> Iterator[Figure]:
    """Figures of the fleet benchmark (see the module docstring)."""
    n = 5 if quick else 50
    with tempfile.TemporaryDirectory(prefix="ivy-bench-fleet-") as directory:
        signer = make_signer(os.path.join(directory, "keys"))
        broker = Broker(os.path.join(directory, "broker"))
        broker.start()
        stations = [
            _Station(os.path.join(directory, f"station-{i}"), i, broker.port, signer)
            for i in range(n)
        ]
        inventory = os.path.join(directory, "inventory.json")
        with open(inventory, "w") as f:
            json.dump(
                {
                    "broker": {
                        "mqtt_host": "127.0.0.1",
                        "mqtt_port": broker.port,
                        "mqtt_client_id": "bench-operator",
                    },
                    "stations": [{"id": s.identifier} for s in stations],
                },
                f,
            )
        tap = _Tap(broker.port)
        try:
            for station in stations:
                if station.cli("start").returncode != 0:
                    raise RuntimeError("a station did not start")
            deadline = time.monotonic() + 600
            while _fleet("status", "--inventory", inventory).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the fleet did not become healthy")
                time.sleep(5)

            # steady state: what the broker carries per station
            before, before_bytes = tap.counts()
            time.sleep(_STEADY_STATE_S)
            after, after_bytes = tap.counts()
            per_station_messages = (after - before) / _STEADY_STATE_S / n
            per_station_bytes = (after_bytes - before_bytes) / _STEADY_STATE_S / n

            waves_s, per_station = _rollout(directory, inventory, signer.private, 2, "1,10%,100%")
            one_wave_s, _ = _rollout(directory, inventory, signer.private, 3, "100%")

            # broker restart with everyone connected
            tap.online_at.clear()
            broker.stop()
            time.sleep(OUTAGE_S)
            restarted = time.time()
            broker.start()
            deadline = time.monotonic() + 300
            while len([t for t in tap.online_at.values() if t >= restarted]) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("not every station came back online")
                time.sleep(0.2)
            ours_share = busiest_second_share(list(tap.online_at.values()))
            while max(station.queued() for station in stations) > 3:
                if time.monotonic() > deadline:
                    raise RuntimeError("the backlogs did not drain")
                time.sleep(0.2)
            drained_s = time.time() - restarted
        finally:
            for station in stations:
                station.cli("stop")
        time.sleep(2)
        lost = sum(
            len(station.archived_data_timestamps() - tap.measured.get(station.identifier, set()))
            for station in stations
        )
        tap.close()
        raw_share = busiest_second_share(raw_clients_reconnect(broker, n))
        broker.stop()

    yield Figure(
        "fleet",
        "rollout_waves_s",
        waves_s,
        f"s until all {n} stations accepted a change in waves 1,10%,100%",
        "the same change to all at once (one wave)",
        one_wave_s,
    )
    yield Figure("fleet", "accepted_p50_s", statistics.median(per_station), "s send to accepted")
    yield Figure("fleet", "accepted_p95_s", _percentile(per_station, 0.95), "s send to accepted")
    yield Figure(
        "fleet",
        "restart_busiest_second_share",
        ours_share,
        f"share of {n} stations back online in the busiest second after a {OUTAGE_S:.0f} s "
        "broker outage (lower is better)",
        f"{n} raw paho-mqtt clients",
        raw_share,
    )
    yield Figure("fleet", "drained_after_restart_s", drained_s, "s until every backlog drained")
    yield Figure("fleet", "lost", float(lost), "data messages archived but never delivered")
    yield Figure("fleet", "per_station_messages_per_s", per_station_messages, "msg/s at the broker")
    yield Figure("fleet", "per_station_bytes_per_s", per_station_bytes, "B/s at the broker")
