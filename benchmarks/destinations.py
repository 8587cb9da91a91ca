"""Benchmarks `destinations` and `reconnect`: several destinations draining one
queue, and a fleet of backends coming back after a broker restart, against
real Mosquittos on free loopback ports.

- destinations / other_down: the drain rate of a Tenta destination while a
  second destination's broker is down and its cap is dropping, vs. the same
  station with one destination (target: a ratio >= 0.8).
- destinations / both_draining_first, both_draining_second: each of two Tenta
  destinations on two brokers draining the same queue at once, vs. the same
  station with one destination. Medians of three alternating rounds; each
  rate is timed from the backend's connection (logged) to the moment its
  destination has nothing left, so that neither side pays for interpreter
  start-up.
- reconnect / busiest_second_share: N backends (each its own station: data
  directory, process, client id) connected to one broker that restarts after
  a 10 s outage: the share of them that reconnects in the busiest second, vs.
  N raw paho-mqtt clients with paho's own exponential backoff (the same cap).
  Lower is better: a thousand stations must not come back in the same second.
"""

from __future__ import annotations

import json
import os
import signal
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
from src.types import Config
from src.utils.messaging_agent import MessagingAgent

from .common import Figure
from .drain import _fill, connection_time, tenta_config
from .mosquitto import Broker

RECONNECT_CAP_S = 8  # reconnect_max_seconds of the backends, max delay of the raw clients
OUTAGE_S = 10.0


def _destination(port: int, client_id: str, **settings: Any) -> dict[str, Any]:
    return {
        "provider": "tenta",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": port,
        "mqtt_client_id": client_id,
        "max_parallel_messages": 50,
        "reconnect_max_seconds": RECONNECT_CAP_S,
        **settings,
    }


def _station_config(destinations: dict[str, dict[str, Any]], port: int) -> dict[str, Any]:
    config = tenta_config(port)
    config["backend"] = None
    config["backends"] = destinations
    return config


def _start_backend(directory: str, config: dict[str, Any], name: str) -> subprocess.Popen[bytes]:
    path = os.path.join(directory, f"config-{name}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return subprocess.Popen(
        [sys.executable, "-m", "src.backend", path, name],
        cwd=constants.PROJECT_DIR,
        env={**os.environ, "IVY_DATA_DIR": directory},
    )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _drain_rates(
    directory: str, config: dict[str, Any], measured: list[str], count: int
) -> dict[str, float]:
    """Fill the queue with `count` data messages for every destination of
    `config`, run a backend for each of them, and return the rate (messages
    per second) of each of `measured` from its connection to its last
    acknowledged message."""
    os.makedirs(directory)
    parsed = Config.model_validate(config)
    agent = MessagingAgent(
        parsed,
        os.path.join(directory, "active-message-queue.sqlite3"),
        os.path.join(directory, "messages"),
    )
    agent.sync_destinations(parsed.destination_routes())
    agent.close()
    agent = _fill(directory, config, count)
    processes = [_start_backend(directory, config, name) for name in config["backends"]]
    drained_at: dict[str, float] = {}
    deadline = time.time() + 900
    try:
        while len(drained_at) < len(measured) and time.time() < deadline:
            time.sleep(0.005)
            for name in measured:
                if name not in drained_at and agent.get_queue_depth(name) == 0:
                    drained_at[name] = time.time()
    finally:
        _stop(processes)
        agent.close()
    if len(drained_at) < len(measured):
        raise RuntimeError(f"not drained in time: only {sorted(drained_at)}")
    return {
        name: count / (at - connection_time(directory, f"backend:{name}"))
        for name, at in drained_at.items()
    }


def run_destinations(quick: bool) -> Iterator[Figure]:
    """Figures other_down, both_draining_first and both_draining_second."""
    count = 50_000 if quick else 200_000
    with (
        tempfile.TemporaryDirectory(prefix="ivy-bench-destinations-") as directory,
        Broker.running(os.path.join(directory, "broker-a")) as first,
        Broker.running(os.path.join(directory, "broker-b")) as second,
    ):
        alone = _station_config({"first": _destination(first.port, "first")}, first.port)
        down = _station_config(
            {
                "first": _destination(first.port, "first"),
                # a broker nobody listens on; its cap drops for it alone
                "second": _destination(1, "second", max_queued_messages=1_000),
            },
            first.port,
        )
        both = _station_config(
            {
                "first": _destination(first.port, "first"),
                "second": _destination(second.port, "second"),
            },
            first.port,
        )
        # alternating rounds, so that each setting sees the same machine
        rates: dict[str, list[float]] = {"single": [], "other_down": [], "first": [], "second": []}
        for round_number in range(3):
            here = os.path.join(directory, f"round-{round_number}")
            rates["single"].append(_drain_rates(here + "-alone", alone, ["first"], count)["first"])
            rates["other_down"].append(
                _drain_rates(here + "-down", down, ["first"], count)["first"]
            )
            together = _drain_rates(here + "-both", both, ["first", "second"], count)
            rates["first"].append(together["first"])
            rates["second"].append(together["second"])
    single, other_down, first_of_both, second_of_both = (
        statistics.median(rates[key]) for key in ("single", "other_down", "first", "second")
    )
    unit = f"messages/s of one destination, {count:,} queued, to acknowledged"
    baseline = "the same station with that destination alone"
    yield Figure("destinations", "other_down", other_down, unit, baseline, single)
    yield Figure("destinations", "both_draining_first", first_of_both, unit, baseline, single)
    yield Figure("destinations", "both_draining_second", second_of_both, unit, baseline, single)


def busiest_second_share(moments: list[float]) -> float:
    """The largest share of `moments` that falls into any one-second window."""
    moments = sorted(moments)
    best, start = 0, 0
    for end, moment in enumerate(moments):
        while moment - moments[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best / len(moments)


def _backends_reconnect(directory: str, broker: Broker, n: int) -> list[float]:
    """Start n one-destination stations on `broker`, restart it after an
    outage, and return when each backend's connection came back (wall
    clock, from each station's state)."""
    processes = []
    for i in range(n):
        station = os.path.join(directory, f"station-{i}")
        os.makedirs(station)
        config = _station_config({"cloud": _destination(broker.port, f"station-{i}")}, broker.port)
        processes.append(_start_backend(station, config, "cloud"))
    try:
        _wait_all_connected(directory, n, since=0.0)
        broker.stop()
        time.sleep(OUTAGE_S)
        restarted = time.time()
        broker.start()
        return _wait_all_connected(directory, n, since=restarted)
    finally:
        _stop(processes)


def _wait_all_connected(directory: str, n: int, since: float) -> list[float]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        moments = []
        for i in range(n):
            try:
                with open(os.path.join(directory, f"station-{i}", "state.json")) as f:
                    connection = json.load(f)["destinations"]["cloud"]
            except (OSError, ValueError, KeyError):
                continue
            if connection["connected"] and connection["since"] >= since:
                moments.append(float(connection["since"]))
        if len(moments) == n:
            return moments
        time.sleep(0.1)
    raise RuntimeError("not every backend reconnected")


def raw_clients_reconnect(broker: Broker, n: int) -> list[float]:
    """n raw paho clients with paho's exponential backoff capped at the same
    maximum; when each reconnected after the same outage."""
    connected: dict[int, float] = {}
    lock = threading.Lock()
    restarted = [float("inf")]
    clients = []
    for i in range(n):

        def on_connect(*_: Any, index: int = i) -> None:
            with lock:
                if time.time() >= restarted[0]:
                    connected.setdefault(index, time.time())

        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"raw-{i}")
        client.reconnect_delay_set(1, RECONNECT_CAP_S)
        client.on_connect = on_connect
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        clients.append(client)
    try:
        broker.stop()
        time.sleep(OUTAGE_S)
        restarted[0] = time.time()
        broker.start()
        deadline = time.monotonic() + 120
        while len(connected) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(connected) < n:
            raise RuntimeError("not every raw client reconnected")
        return list(connected.values())
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()


def run_reconnect(quick: bool) -> Iterator[Figure]:
    """Figure busiest_second_share."""
    n = 10 if quick else 40
    with (
        tempfile.TemporaryDirectory(prefix="ivy-bench-reconnect-") as directory,
        Broker.running(os.path.join(directory, "broker")) as broker,
    ):
        ours = busiest_second_share(_backends_reconnect(directory, broker, n))
        raw = busiest_second_share(raw_clients_reconnect(broker, n))
    yield Figure(
        "reconnect",
        "busiest_second_share",
        ours,
        f"share of {n} stations reconnecting in the busiest second after a "
        f"{OUTAGE_S:.0f} s broker outage (lower is better)",
        f"{n} raw paho-mqtt clients, paho's exponential backoff capped at {RECONNECT_CAP_S} s",
        raw,
    )
