"""The durable queue and the archive, on real SQLite files."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import time
from typing import Any

import pytest

from src import constants
from src.backend.provider import pack_rows
from src.backend.thingsboard_backend import ThingsBoardProvider
from src.types import (
    Config,
    ConfigMessageBody,
    DataMessageBody,
    LogMessageBody,
)
from src.utils.functions import utc_date_string
from src.utils.messaging_agent import QUEUE_SCHEMA_VERSION, MessagingAgent
from tests.conftest import template_config_dict
from tests.server_rules import check_payload

pytestmark = pytest.mark.quick


def data(i: int) -> DataMessageBody:
    return DataMessageBody(data={"i": i, "value": i * 0.5, "label": f"m{i}"})


def capped_config(cap: int) -> Config:
    config = template_config_dict()
    config["storage"]["max_queued_messages"] = cap
    return Config.model_validate(config)


def test_add_is_visible_to_a_new_connection_and_fifo() -> None:
    agent = MessagingAgent()
    ids = [agent.add_message(data(i)) for i in range(5)]
    other = MessagingAgent()
    rows = other.get_oldest_rows(10)
    assert [other.identifier_of(r.id) for r in rows] == ids
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    messages = other.get_n_latest_messages(2)
    assert [m.body for m in messages] == [data(0), data(1)]
    assert other.get_queue_depth() == 5
    assert len(set(ids)) == 5


def test_excluded_ids_are_skipped_in_order() -> None:
    agent = MessagingAgent()
    agent.add_messages([data(i) for i in range(20)])
    rows = agent.get_oldest_rows(20)
    in_flight = {rows[0].id, rows[1].id, rows[5].id}
    fetched = agent.get_oldest_rows(4, excluded_message_ids=in_flight)
    assert [r.id for r in fetched] == [rows[2].id, rows[3].id, rows[4].id, rows[6].id]
    everything_excluded = agent.get_oldest_rows(5, {r.id for r in rows})
    assert everything_excluded == []


def test_remove_deletes_only_acknowledged_rows() -> None:
    agent = MessagingAgent()
    agent.add_messages([data(i) for i in range(10)])
    rows = agent.get_oldest_rows(10)
    agent.remove_messages([rows[0].id, rows[3].id, 999_999])  # unknown ids are ignored
    remaining = agent.get_oldest_rows(10)
    assert [r.id for r in remaining] == [r.id for r in rows if r.id not in (rows[0].id, rows[3].id)]
    assert agent.get_queue_depth() == 8


def test_oldest_age_uses_the_measurement_time() -> None:
    agent = MessagingAgent()
    assert agent.get_oldest_message_age() is None
    agent.add_message(data(0), timestamp=1000.0)
    agent.add_message(data(1), timestamp=2000.0)
    assert agent.get_oldest_message_age(now=1500.0) == pytest.approx(500.0)


def test_archive_holds_every_message_before_and_after_flush() -> None:
    agent = MessagingAgent()
    now = time.time()
    ids = agent.add_messages([data(i) for i in range(3)], timestamp=now)
    ids.append(agent.add_message(LogMessageBody(level="INFO", subject="s", body="b"), now))
    today = utc_date_string(now)
    assert [
        m.message_identifier for m in agent.load_message_archive(today)
    ] == ids  # from the outbox
    assert agent.flush_archive() == 4
    assert agent.flush_archive() == 0
    assert os.path.isfile(os.path.join(constants.MESSAGE_ARCHIVE_DIR, f"{today}.jsonl"))
    agent.remove_messages([r.id for r in agent.get_oldest_rows(10)])  # sent: archive stays
    archived = agent.load_message_archive(datetime.date.fromisoformat(today))
    assert [m.message_identifier for m in archived] == ids
    assert archived[0].body == data(0)
    assert archived[0].timestamp == now


def test_archive_files_follow_the_utc_date_of_the_message() -> None:
    agent = MessagingAgent()
    agent.add_message(data(1), timestamp=1_700_000_000.0)  # 2023-11-14 UTC
    agent.add_message(data(2), timestamp=1_700_100_000.0)  # 2023-11-16 UTC
    agent.flush_archive()
    assert sorted(os.listdir(constants.MESSAGE_ARCHIVE_DIR)) == [
        "2023-11-14.jsonl",
        "2023-11-16.jsonl",
    ]


def test_archive_skips_torn_lines_and_duplicates() -> None:
    agent = MessagingAgent()
    agent.add_message(data(1), timestamp=1_700_000_000.0)
    agent.flush_archive()
    path = os.path.join(constants.MESSAGE_ARCHIVE_DIR, "2023-11-14.jsonl")
    with open(path) as f:
        line = f.read()
    with open(path, "a") as f:
        f.write(line)  # a flush replayed after a crash
        f.write('{"identifier": "torn", "timest')  # a power loss mid-line
    assert len(agent.load_message_archive("2023-11-14")) == 1


def test_a_flush_after_a_torn_line_starts_a_line_of_its_own() -> None:
    # the chaos harness's torn-archive fault: the next append was glued to the torn half,
    # and its first message was lost to every archive reader
    agent = MessagingAgent()
    agent.add_message(data(1), timestamp=1_700_000_000.0)
    agent.flush_archive()
    path = os.path.join(constants.MESSAGE_ARCHIVE_DIR, "2023-11-14.jsonl")
    with open(path, "a") as f:
        f.write('{"identifier": "torn", "timest')  # a power loss mid-append
    agent.add_messages([data(2), data(3)], timestamp=1_700_000_001.0)
    agent.flush_archive()
    assert [m.body for m in agent.load_message_archive("2023-11-14")] == [
        data(1),
        data(2),
        data(3),
    ]


def test_a_short_write_on_a_full_disk_does_not_count_as_archived(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the chaos harness's full disk: the kernel took part of the batch, the
    # rest was never written, and the batch still counted as archived
    agent = MessagingAgent()
    agent.add_messages([data(i) for i in range(3)], timestamp=1_700_000_000.0)
    real_write = os.write
    calls: list[int] = []

    def nearly_full(fd: int, content: Any) -> int:
        calls.append(len(content))
        if len(calls) == 1:
            return real_write(fd, bytes(content)[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", nearly_full)
    with pytest.raises(OSError, match="No space left"):
        agent.flush_archive()
    monkeypatch.setattr(os, "write", real_write)
    agent.flush_archive()
    archived = agent.load_message_archive("2023-11-14", archive_dir=None)
    assert [m.body for m in archived] == [data(0), data(1), data(2)]


def test_the_cap_never_drops_rows_already_sent_so_the_drop_count_is_exact() -> None:
    # the chaos soak: rows in flight when the backend was killed had reached
    # the broker, then the cap dropped them and counted them as never delivered
    agent = MessagingAgent(capped_config(1000))
    agent.add_messages([data(i) for i in range(1000)])
    in_flight = agent.take_rows_to_send(50)
    agent.add_messages([data(i) for i in range(1000, 1100)])  # the cap drops
    kept = [m.body for m in agent.get_n_latest_messages(2000)]
    assert kept[:50] == [data(i) for i in range(50)]  # sent: they may have arrived
    unsent = kept[50:]
    assert len(unsent) <= 1000
    assert unsent == [data(i) for i in range(1100 - len(unsent), 1100)]  # oldest unsent dropped
    assert agent.get_dropped_count() == 1050 - len(unsent)
    agent.remove_messages([row.id for row in in_flight])  # their PUBACKs arrive (late)
    assert agent.get_dropped_count() == 1050 - len(unsent)
    assert agent.get_queue_depth() == len(unsent)


def test_the_sent_mark_survives_a_new_process_and_never_moves_back() -> None:
    agent = MessagingAgent(capped_config(1000))
    agent.add_messages([data(i) for i in range(1000)])
    assert len(agent.take_rows_to_send(20)) == 20
    rewound = MessagingAgent(capped_config(1000))  # a backend started again
    assert len(rewound.take_rows_to_send(10)) == 10  # the mark stays at 20
    agent.close()
    again = MessagingAgent(capped_config(1000))  # e.g. the producer after a restart
    again.add_messages([data(i) for i in range(1000, 1100)])  # the cap drops
    kept = [m.body for m in again.get_n_latest_messages(30)]
    assert kept[:20] == [data(i) for i in range(20)]
    assert data(20) not in kept


def _produce_at_the_cap(batches: int) -> None:
    agent = MessagingAgent(capped_config(1000))
    for _ in range(batches):
        agent.add_messages([data(i) for i in range(10)])


def test_a_row_taken_to_send_is_never_dropped_by_a_producer_at_the_cap() -> None:
    # the second chaos soak: a producer's cap dropped rows between the backend's
    # read and its mark; they went out anyway and were counted as dropped too
    agent = MessagingAgent(capped_config(1000))
    producer = multiprocessing.get_context("fork").Process(
        target=_produce_at_the_cap, args=(2_000,)
    )
    producer.start()
    taken, cursor = 0, 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = agent.take_rows_to_send(5, after_id=cursor)
        if rows:
            cursor = rows[-1].id
            taken += len(rows)
            agent.remove_messages([row.id for row in rows])  # acknowledged at once
        elif not producer.is_alive():
            break
    producer.join(30)
    assert producer.exitcode == 0
    assert agent.get_dropped_count("data") > 0  # the cap was reached throughout
    assert taken + agent.get_dropped_count("data") == 20_000


def test_cap_drops_oldest_data_first_and_counts() -> None:
    agent = MessagingAgent(capped_config(1000))
    agent.add_message(
        ConfigMessageBody(status="startup", config_revision=0, software_version="0.1.0")
    )
    agent.add_message(LogMessageBody(level="WARNING", subject="early log"))
    agent.add_messages([data(i) for i in range(1200)])
    depth = agent.get_queue_depth()
    assert depth <= 1000
    assert agent.get_dropped_count() == 1202 - depth
    assert agent.get_dropped_count("data") == 1202 - depth
    assert agent.get_dropped_count("log") == 0
    variants = [r.variant for r in agent.get_oldest_rows(2000)]
    assert variants[:2] == ["config", "log"]  # kept: only data was dropped
    remaining = [m.body for m in agent.get_n_latest_messages(2000)[2:]]
    assert remaining == [data(i) for i in range(1200 - len(remaining), 1200)]  # newest kept
    # the archive is never capped
    assert len(agent.load_message_archive(utc_date_string(time.time()))) == 1202


def test_cap_drops_logs_before_config_answers_when_no_data_is_left() -> None:
    agent = MessagingAgent(capped_config(1000))
    agent.add_message(
        ConfigMessageBody(status="accepted", config_revision=1, software_version="1.0.0")
    )
    agent.add_messages([LogMessageBody(level="INFO", subject=str(i)) for i in range(1100)])
    assert [r.variant for r in agent.get_oldest_rows(1)] == ["config"]
    assert agent.get_queue_depth() <= 1000


def test_invalid_body_is_rejected_before_anything_is_written() -> None:
    agent = MessagingAgent()
    with pytest.raises(ValueError, match="finite"):
        agent.add_message(DataMessageBody(data={"x": float("nan")}))
    with pytest.raises(ValueError, match="data"):
        DataMessageBody(data={})
    assert agent.get_queue_depth() == 0
    assert agent.load_message_archive(utc_date_string(time.time())) == []


def test_what_no_backend_can_carry_is_refused_with_a_clear_error() -> None:
    agent = MessagingAgent()
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        agent.add_message(DataMessageBody(data={"x": 10**30}))
    for timestamp in (10**30, -5.0, float("nan"), "soon"):
        with pytest.raises(ValueError, match="timestamp"):
            agent.add_message(DataMessageBody(data={"x": 1}), timestamp=timestamp)  # type: ignore[arg-type]
    assert DataMessageBody(data={"on": True}).data == {"on": True}  # kept, not 1.0
    identifier = agent.add_message(DataMessageBody(data={"x": 1}))  # the queue still works
    assert agent.get_queue_depth() == 1 and identifier.endswith("-1")


def test_synchronous_setting_is_applied() -> None:
    config = template_config_dict()
    config["storage"]["sqlite_synchronous"] = "NORMAL"
    agent = MessagingAgent(Config.model_validate(config))
    assert agent.connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert MessagingAgent().connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert agent.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_queue_from_before_schema_versions_is_migrated_in_place() -> None:
    agent = MessagingAgent()
    identifier = agent.add_message(data(1))
    agent.connection.execute("PRAGMA user_version = 0")  # as every queue was before
    agent.close()
    reopened = MessagingAgent()
    assert reopened.get_schema_version() == QUEUE_SCHEMA_VERSION
    assert [reopened.identifier_of(r.id) for r in reopened.get_oldest_rows(10)] == [identifier]


def test_a_queue_a_newer_version_extended_stays_usable_after_going_back() -> None:
    """What a newer version may do (add a column with a default, a table, and
    rows of a kind this version does not know): this version leaves its
    schema version alone, writes and reads, and sends the unknown row out as
    an error holding its raw body instead of being stuck on it."""
    newer = MessagingAgent()
    newer.connection.executescript(
        f"""
        ALTER TABLE queue ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE future_things (x INTEGER);
        PRAGMA user_version = {QUEUE_SCHEMA_VERSION + 1};
        INSERT INTO queue (timestamp, variant, config_revision, body, priority)
            VALUES (1700000000.5, 'hologram', 3, '{{"variant": "hologram", "z": [1]}}', 9);
        """
    )
    newer.close()
    agent = MessagingAgent()
    assert agent.get_schema_version() == QUEUE_SCHEMA_VERSION + 1
    agent.add_message(data(2))
    rows = agent.get_oldest_rows(10)
    assert [r.variant for r in rows] == ["hologram", "data"]

    config = template_config_dict()
    config["backend"] = {"provider": "thingsboard", "mqtt_host": "localhost", "mqtt_client_id": "c"}
    publishes = pack_rows(
        ThingsBoardProvider(Config.model_validate(config)), rows, agent.identifier_of
    )
    items = [item for p in publishes for item in json.loads(p.payload())]
    for publish in publishes:
        check_payload(publish.topic, publish.payload())
    unknown = items[0]["values"]
    assert unknown["error"].startswith("unreadable queued message")
    assert '{"variant": "hologram", "z": [1]}' in unknown["error"]
    assert items[-1]["values"]["i"] == 2
    agent.remove_messages(r.id for r in rows)
    assert agent.get_queue_depth() == 0
