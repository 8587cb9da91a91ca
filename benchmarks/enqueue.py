"""Benchmark `enqueue`: the durable queue against raw sqlite3 with the same
pragmas (WAL, synchronous=FULL), on the same disk, in the same run.

- single_add: durable `add_message` (archive included: the outbox is flushed to
  the JSONL file inside the timed section) vs. one raw INSERT + COMMIT per row.
- batch_add: `add_messages` with 100 per call (what a producer waits for: the
  messages are durable in the queue and, through it, for the archive) vs. a
  raw executemany of 100 rows per COMMIT.
- archive_flush: the main loop's background append of those messages to the
  daily JSONL file vs. a raw write of the same lines with one fsync per batch.
- fetch_remove_scaling: one drain step (fetch the 100 oldest rows not in
  flight, delete the previous 100) at 1,000,000 queued rows divided by the same
  at 1,000 rows.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator

from src import constants
from src.types import DataMessageBody
from src.utils.messaging_agent import MessagingAgent

from .common import Figure, median_of_alternating, rate

NAME = "enqueue"
BODY = DataMessageBody(data={"co2_ppm": 415.27, "temperature_c": 21.5, "sensor": "A1"})
BATCH = 100
_ARCHIVE_CHUNK = 5_000  # the batch size of MessagingAgent.flush_archive


def _raw_connection(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, body TEXT)")
    return connection


def _single_add(directory: str, count: int, rounds: int) -> Figure:
    agent = MessagingAgent(
        None, os.path.join(directory, "ivy.sqlite3"), os.path.join(directory, "archive")
    )
    raw = _raw_connection(os.path.join(directory, "raw.sqlite3"))
    body_json = BODY.model_dump_json()

    def ours() -> None:
        for _ in range(count):
            agent.add_message(BODY)
        agent.flush_archive()

    def baseline() -> None:
        for _ in range(count):
            raw.execute("BEGIN")
            raw.execute("INSERT INTO q (body) VALUES (?)", (body_json,))
            raw.execute("COMMIT")

    ours_rate, raw_rate = median_of_alternating(
        rounds, lambda: rate(count, ours), lambda: rate(count, baseline)
    )
    return Figure(
        NAME,
        "single_add",
        ours_rate,
        "messages/s",
        "raw sqlite3 INSERT+COMMIT per row, same pragmas",
        raw_rate,
    )


def _batch_add(directory: str, count: int, rounds: int) -> Figure:
    agent = MessagingAgent(
        None, os.path.join(directory, "ivy-batch.sqlite3"), os.path.join(directory, "archive")
    )
    raw = _raw_connection(os.path.join(directory, "raw-batch.sqlite3"))
    body_json = BODY.model_dump_json()
    bodies = [BODY] * BATCH

    def ours() -> None:
        for _ in range(count // BATCH):
            agent.add_messages(bodies)

    def baseline() -> None:
        for _ in range(count // BATCH):
            raw.execute("BEGIN")
            raw.executemany("INSERT INTO q (body) VALUES (?)", [(body_json,)] * BATCH)
            raw.execute("COMMIT")

    ours_rate, raw_rate = median_of_alternating(
        rounds, lambda: rate(count, ours), lambda: rate(count, baseline)
    )
    return Figure(
        NAME,
        "batch_add",
        ours_rate,
        "messages/s",
        f"raw sqlite3 executemany, {BATCH} rows per COMMIT",
        raw_rate,
    )


def _archive_flush(directory: str, count: int, rounds: int) -> Figure:
    agent = MessagingAgent(
        None, os.path.join(directory, "ivy-flush.sqlite3"), os.path.join(directory, "archive")
    )
    lines = [line + "\n" for line in _example_archive_lines(agent, BATCH)]
    raw_path = os.path.join(directory, "raw-archive.jsonl")

    def ours() -> None:
        for _ in range(count // BATCH):
            agent.add_messages([BODY] * BATCH)
        started = time.perf_counter()
        agent.flush_archive()
        timings.append(time.perf_counter() - started)

    def baseline() -> None:
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for _ in range(0, count, _ARCHIVE_CHUNK):
                os.write(fd, "".join(lines * (_ARCHIVE_CHUNK // BATCH)).encode())
                os.fsync(fd)
        finally:
            os.close(fd)

    ours_rates: list[float] = []
    raw_rates: list[float] = []
    for _ in range(rounds):
        timings: list[float] = []
        ours()
        ours_rates.append(count / timings[0])
        raw_rates.append(rate(count, baseline))
    return Figure(
        NAME,
        "archive_flush",
        statistics.median(ours_rates),
        "messages/s (main loop, in the background)",
        f"raw append of the same lines, one fsync per {_ARCHIVE_CHUNK:,}",
        statistics.median(raw_rates),
    )


def _example_archive_lines(agent: MessagingAgent, n: int) -> list[str]:
    agent.add_messages([BODY] * n)
    agent.flush_archive()
    path = os.path.join(agent.archive_dir, os.listdir(agent.archive_dir)[0])
    with open(path) as f:
        return f.read().splitlines()[-n:]


def _seconds_per_drain_step(agent: MessagingAgent, steps: int) -> float:
    in_flight: list[int] = []
    durations: list[float] = []
    for _ in range(steps):
        started = time.perf_counter()
        fetched = agent.get_n_latest_messages(BATCH, excluded_message_ids=in_flight)
        agent.remove_messages(in_flight)
        durations.append(time.perf_counter() - started)
        in_flight = [m.id for m in fetched]
    return statistics.median(durations)


def _filled_agent(directory: str, name: str, rows: int) -> MessagingAgent:
    agent = MessagingAgent(
        None, os.path.join(directory, f"{name}.sqlite3"), os.path.join(directory, name)
    )
    chunk = [BODY] * 10_000
    for start in range(0, rows, len(chunk)):
        agent.add_messages(chunk[: min(len(chunk), rows - start)])
    return agent


def _fetch_remove_scaling(directory: str, large: int, steps: int) -> Figure:
    small_agent = _filled_agent(directory, "small", 1_000 + BATCH * steps)
    large_agent = _filled_agent(directory, "large", large + BATCH * steps)
    small = _seconds_per_drain_step(small_agent, steps)
    big = _seconds_per_drain_step(large_agent, steps)
    return Figure(
        NAME,
        "fetch_remove_scaling",
        big,
        f"s per fetch+remove of {BATCH} at {large:,} rows",
        "the same at 1,000 rows",
        small,
    )


def run(quick: bool) -> Iterator[Figure]:
    """Yield the figures of this benchmark."""
    os.makedirs(constants.DATA_DIR, exist_ok=True)
    # the data directory's disk: where the station's queue lives
    with tempfile.TemporaryDirectory(dir=constants.DATA_DIR, prefix="benchmark-") as directory:
        yield _single_add(directory, count=300 if quick else 1_000, rounds=5)
        yield _batch_add(directory, count=5_000 if quick else 30_000, rounds=5)
        yield _archive_flush(directory, count=5_000 if quick else 50_000, rounds=3)
        yield _fetch_remove_scaling(directory, large=100_000 if quick else 1_000_000, steps=200)
