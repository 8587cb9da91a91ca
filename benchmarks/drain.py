"""Benchmarks `drain` and `backlog`: the Tenta backend process against a real
Mosquitto on a free loopback port, side by side with raw paho-mqtt.

- drain / drain_rate: messages per second from a pre-filled queue to
  acknowledged and deleted, vs. a raw paho QoS 1 loop publishing the same
  messages one per publish (same broker, same in-flight window). Neither pays
  for interpreter start-up: ours is timed from the moment the backend logs its
  connection, the raw loop from its first publish (already connected).
- backlog / last_tenth_vs_first: with a large queue, the drain rate over the
  last tenth divided by the rate over the first tenth (does it slow down as
  the queue is consumed?). backlog / peak_rss_mb: the backend process's peak
  resident memory while doing so.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from src import constants
from src.backend.tenta_backend import TentaProvider
from src.types import Config, DataMessageBody
from src.utils.messaging_agent import MessagingAgent

from .common import Figure
from .mosquitto import Broker

STATION = "0b1f5a52-7c3e-4d2a-8f6b-3e9d1c2a4b5f"  # Tenta: the sensor UUID
MAX_PARALLEL = 50


def tenta_config(port: int) -> dict[str, Any]:
    """The template with the Tenta backend on a local broker at `port`."""
    with open(constants.CONFIG_TEMPLATE_PATH) as f:
        config: dict[str, Any] = json.load(f)
    config["general"]["system_identifier"] = STATION
    config["logging_verbosity"] = {
        "console_prints": None,
        "file_archive": "INFO",
        "message_sending": None,
    }
    config["backend"] = {
        "provider": "tenta",
        "mqtt_host": "127.0.0.1",
        "mqtt_port": port,
        "mqtt_client_id": "ivy-benchmark",
        "max_parallel_messages": MAX_PARALLEL,
    }
    return config


def _fill(directory: str, config: dict[str, Any], count: int) -> MessagingAgent:
    agent = MessagingAgent(
        Config.model_validate(config),
        os.path.join(directory, "active-message-queue.sqlite3"),
        os.path.join(directory, "messages"),
    )
    chunk = 10_000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        agent.add_messages(
            [
                DataMessageBody(data={"co2_ppm": 400 + i % 50 * 0.1, "temperature_c": 21.5})
                for i in range(n)
            ]
        )
    agent.flush_archive()  # the main loop keeps the archive up to date
    return agent


def _drain_with_ivy(
    directory: str, config: dict[str, Any], agent: MessagingAgent, timeout: float
) -> tuple[list[tuple[float, int]], float]:
    """Run the backend until the queue is empty; return (time, depth) samples
    and the peak RSS in MB."""
    config_path = os.path.join(directory, "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    total = agent.get_queue_depth()
    process = subprocess.Popen(
        [sys.executable, "-m", "src.backend", config_path],
        cwd=constants.PROJECT_DIR,
        env={**os.environ, "IVY_DATA_DIR": directory},
    )
    samples: list[tuple[float, int]] = [(time.time(), total)]
    peak_rss = 0
    deadline = time.time() + timeout
    try:
        watched = psutil.Process(process.pid)
        while samples[-1][1] > 0 and time.time() < deadline:
            time.sleep(0.01)
            samples.append((time.time(), agent.get_queue_depth()))
            try:
                peak_rss = max(peak_rss, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    if samples[-1][1] != 0:
        raise RuntimeError(f"the backend left {samples[-1][1]} of {total} messages")
    connected_at = connection_time(directory)
    return [(connected_at, total)] + [s for s in samples if s[0] > connected_at], peak_rss / 1e6


def connection_time(directory: str, process: str = "backend") -> float:
    """When the backend process `process` logged "MQTT connected" (its log
    lines carry UTC times). Used by the drain and destinations benchmarks."""
    for name in sorted(os.listdir(os.path.join(directory, "logs"))):
        with open(os.path.join(directory, "logs", name)) as f:
            for line in f:
                if f" - {process} - INFO - MQTT connected to " in line:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")
                    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
    raise RuntimeError("the backend never logged its connection")


def _rate_until(samples: list[tuple[float, int]], start: int, low: int) -> float:
    """Messages per second from sample `start` to the first at or below `low`."""
    end = next(i for i, (_, depth) in enumerate(samples) if depth <= low)
    return (samples[start][1] - samples[end][1]) / (samples[end][0] - samples[start][0])


def _last_index_at_or_above(samples: list[tuple[float, int]], depth: int) -> int:
    return max(i for i, (_, d) in enumerate(samples) if d >= depth)


def _raw_paho_rate(port: int, agent: MessagingAgent, count: int, per_publish: int) -> float:
    """Publish the same messages, `per_publish` items per publish as one JSON
    array, QoS 1, and wait for every PUBACK; messages per second."""
    provider = TentaProvider(Config.model_validate(tenta_config(port)))
    items = [
        item.decode() if isinstance(item, bytes) else json.dumps(item)
        for row in agent.get_oldest_rows(count)
        for _, item in provider.items_of(row, agent.identifier_of(row.id))
    ]
    payloads = [
        ("[" + ",".join(items[i : i + per_publish]) + "]").encode()
        for i in range(0, len(items), per_publish)
    ]
    acknowledged = 0
    done = threading.Event()
    # message ids are 16 bit: paho refuses a publish whose id is still
    # outstanding, so even a raw loop must bound what it has queued
    window = threading.Semaphore(10_000)

    def on_publish(*_: Any) -> None:
        nonlocal acknowledged
        acknowledged += 1
        window.release()
        if acknowledged == len(payloads):
            done.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-paho")
    client.max_inflight_messages_set(MAX_PARALLEL)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        started = time.perf_counter()
        for payload in payloads:
            window.acquire()
            client.publish(f"measurements/{STATION}", payload, qos=1)
        if not done.wait(600):
            raise RuntimeError("raw paho: not every PUBACK arrived")
        ended = time.perf_counter()
    finally:
        client.disconnect()
        client.loop_stop()
    return len(items) / (ended - started)


def run_drain(quick: bool) -> Iterator[Figure]:
    """Figure drain_rate."""
    count = 10_000 if quick else 100_000
    with (
        tempfile.TemporaryDirectory(prefix="ivy-bench-drain-") as directory,
        Broker.running(os.path.join(directory, "broker")) as broker,
    ):
        config = tenta_config(broker.port)
        baseline_agent = _fill(os.path.join(directory, "baseline"), config, count)
        raw_rate = _raw_paho_rate(broker.port, baseline_agent, count, 1)
        raw_array_rate = _raw_paho_rate(broker.port, baseline_agent, count, 100)
        ivy_dir = os.path.join(directory, "ivy")
        agent = _fill(ivy_dir, config, count)
        samples, _ = _drain_with_ivy(ivy_dir, config, agent, timeout=600)
        ours = _rate_until(samples, 0, 0)  # sample 0: the connection
    yield Figure(
        "drain",
        "drain_rate",
        ours,
        f"messages/s, {count:,} queued, to acknowledged and deleted",
        f"raw paho-mqtt QoS 1, one message per publish, {MAX_PARALLEL} in flight",
        raw_rate,
    )
    yield Figure(
        "drain",
        "drain_rate_vs_arrays",
        ours,
        f"messages/s, {count:,} queued, to acknowledged and deleted",
        f"raw paho-mqtt QoS 1, the same items as JSON arrays of 100, {MAX_PARALLEL} in flight",
        raw_array_rate,
    )


def run_backlog(quick: bool) -> Iterator[Figure]:
    """Figures last_tenth_vs_first and peak_rss_mb."""
    count = 100_000 if quick else 1_000_000
    with (
        tempfile.TemporaryDirectory(prefix="ivy-bench-backlog-") as directory,
        Broker.running(os.path.join(directory, "broker")) as broker,
    ):
        config = tenta_config(broker.port)
        agent = _fill(directory, config, count)
        samples, peak_rss_mb = _drain_with_ivy(directory, config, agent, timeout=1_800)
    first = _rate_until(samples, 0, count - count // 10)
    last = _rate_until(samples, _last_index_at_or_above(samples, count // 10), 0)
    yield Figure(
        "backlog",
        "last_tenth_vs_first",
        last,
        f"messages/s over the last tenth of {count:,}",
        "drain rate over the first tenth",
        first,
    )
    yield Figure("backlog", "peak_rss_mb", peak_rss_mb, f"MB, backend process, {count:,} queued")
