"""Several destinations drain the one queue, each through its own bit in every
row: routing by variant, acknowledgement per destination, a row leaving only
when no destination keeps it, a cap and exact drop count per destination that
never touches another's rows, gap records, and destinations coming and going.
Real SQLite files; every test counts."""

from __future__ import annotations

import pytest

from src.types import DataMessageBody, LogMessageBody
from src.utils.messaging_agent import MessagingAgent, QueueRow

pytestmark = pytest.mark.quick

ALL = frozenset({"data", "log", "config"})


def data(i: int) -> DataMessageBody:
    return DataMessageBody(data={"i": i})


def ids(rows: list[QueueRow]) -> list[int]:
    return [row.id for row in rows]


def test_rows_go_to_the_destinations_of_their_variant_and_leave_when_all_have_them() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"tenta": (ALL, 1_000), "monitor": (frozenset({"data"}), 1_000)})
    agent.add_messages([data(1), LogMessageBody(level="ERROR", subject="s", body="")])
    data_row, log_row = ids(agent.get_oldest_rows(10))
    assert ids(agent.take_rows_to_send(10, destination="tenta", stream="priority")) == [log_row]
    assert ids(agent.take_rows_to_send(10, destination="tenta", stream="data")) == [data_row]
    assert ids(agent.take_rows_to_send(10, destination="monitor", stream="priority")) == []
    assert ids(agent.take_rows_to_send(10, destination="monitor", stream="data")) == [data_row]
    assert (agent.get_queue_depth("tenta"), agent.get_queue_depth("monitor")) == (2, 1)
    agent.acknowledge("tenta", [data_row, log_row])
    assert agent.get_queue_depth() == 1  # the data row waits for monitor
    assert (agent.get_queue_depth("tenta"), agent.get_queue_depth("monitor")) == (0, 1)
    agent.acknowledge("monitor", [data_row])
    assert agent.get_queue_depth() == 0
    assert agent.flush_archive() == 0  # archived before they left


def test_a_destination_that_is_down_keeps_only_its_own_cap_and_counts_exactly_what_it_lost() -> (
    None
):
    agent = MessagingAgent()
    agent.sync_destinations({"down": (ALL, 1_000), "up": (ALL, 2_000)})
    produced = 0
    for _ in range(50):
        agent.add_messages([data(produced + i) for i in range(100)])
        produced += 100
        rows = agent.take_rows_to_send(1_000, destination="up", stream="data")
        agent.acknowledge("up", ids(rows))
    assert agent.get_queue_depth("up") == 0 and agent.get_dropped_count(destination="up") == 0
    kept = agent.get_queue_depth("down")
    dropped = agent.get_dropped_count(destination="down")
    assert kept <= 1_000 and kept + dropped == produced
    assert agent.get_queue_depth() == kept  # bounded by the largest cap, not the sum
    # oldest first: what is left for `down` is the newest
    left = [int(r.body.split('"i":')[1].rstrip("}")) for r in agent.get_oldest_rows(5_000)]
    assert left == list(range(produced - kept, produced))


def test_the_cap_never_drops_a_row_that_may_be_in_flight() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"slow": (ALL, 1_000)})
    agent.add_messages([data(i) for i in range(500)])
    in_flight = ids(agent.take_rows_to_send(500, destination="slow", stream="data"))
    agent.add_messages([data(i) for i in range(500, 2_000)])
    remaining = set(ids(agent.get_oldest_rows(5_000, destination="slow")))
    assert set(in_flight) <= remaining
    assert agent.get_dropped_count(destination="slow") + len(remaining) == 2_000
    agent.acknowledge("slow", in_flight)
    assert agent.get_queue_depth("slow") + agent.get_dropped_count(destination="slow") == 1_500


def test_a_gap_record_names_what_the_cap_dropped_and_is_queued_once() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 1_000), "b": (ALL, 100_000)})
    for batch in range(30):
        agent.add_messages([data(i) for i in range(100)], timestamp=1_000_000.0 + batch)
    dropped = agent.get_dropped_count(destination="a")
    assert dropped > 0

    def record(count: int, first: float, last: float) -> LogMessageBody:
        return LogMessageBody(level="WARNING", subject=f"gap {count} {first} {last}", body="")

    assert agent.record_gap("a", record) == dropped
    assert agent.record_gap("a", record) == 0
    assert agent.record_gap("b", record) == 0
    gap_rows = [r for r in agent.get_oldest_rows(100_000, destination="a") if r.variant == "log"]
    assert len(gap_rows) == 1 and f"gap {dropped} 1000000.0" in gap_rows[0].body
    assert [r for r in agent.get_oldest_rows(100_000, destination="b") if r.variant == "log"] == []


def test_removing_a_destination_releases_what_only_it_kept() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 10_000), "b": (ALL, 10_000)})
    agent.add_messages([data(i) for i in range(10)])
    agent.acknowledge("b", ids(agent.take_rows_to_send(10, destination="b", stream="data")))
    assert agent.get_queue_depth() == 10  # kept for a
    # what it had not got is counted for the main loop's warning
    assert agent.sync_destinations({"b": (ALL, 10_000)}) == {"a": 10}
    assert agent.get_queue_depth() == 0 and agent.get_queue_depth("a") == 0
    agent.add_messages([data(10)])
    assert agent.get_queue_depth("b") == 1


def test_what_waited_goes_to_the_first_destinations_and_a_later_one_starts_empty() -> None:
    agent = MessagingAgent()
    agent.add_messages([data(i) for i in range(5)])  # no backend yet
    agent.sync_destinations({"first": (ALL, 10_000)})
    assert agent.get_queue_depth("first") == 5
    agent.sync_destinations({"first": (ALL, 10_000), "later": (ALL, 10_000)})
    assert agent.get_queue_depth("later") == 0
    agent.add_messages([data(5)])
    assert (agent.get_queue_depth("first"), agent.get_queue_depth("later")) == (6, 1)


def test_rows_an_older_version_writes_go_to_every_destination() -> None:
    """After going back to a version before destinations, its inserts name no
    `pending`: the column's default sends them everywhere."""
    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 10_000), "b": (ALL, 10_000)})
    agent.connection.execute(
        "INSERT INTO queue (timestamp, variant, config_revision, body) "
        """VALUES (1.0, 'data', 0, '{"variant":"data","data":{"x":1}}')"""
    )
    assert len(agent.get_oldest_rows(10, destination="a")) == 1
    assert len(agent.get_oldest_rows(10, destination="b")) == 1


def test_the_reference_apis_removal_releases_for_everyone() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 10_000), "b": (ALL, 10_000)})
    agent.add_messages([data(i) for i in range(4)])
    agent.remove_messages(ids(agent.get_oldest_rows(2)))
    assert agent.get_queue_depth() == 2
    assert agent.get_queue_depth("a") == agent.get_queue_depth("b") == 2


def test_a_destination_settings_change_keeps_its_rows_and_counters() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 10_000)})
    agent.add_messages([data(i) for i in range(3)])
    agent.sync_destinations({"a": (frozenset({"data"}), 5_000)})
    assert agent.get_queue_depth("a") == 3
    assert agent.destinations["a"].max_queued == 5_000


def test_rows_of_a_variant_no_destination_takes_leave_once_archived() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"a": (frozenset({"data"}), 10_000)})
    agent.add_messages([LogMessageBody(level="INFO", subject="only for the archive", body="")])
    assert agent.flush_archive() == 1
    assert agent.get_queue_depth() == 0
    assert agent.get_queue_depth("a") == 0


def test_a_new_backend_process_resumes_an_unfinished_newest_first_catch_up() -> None:
    from src.backend.streams import StreamCursors

    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 1_000)})
    agent.add_messages([data(i) for i in range(2_000)])
    live_from = agent.begin_live_catch_up("a")
    agent.add_messages([data(i) for i in range(2_000, 2_010)])
    live = ids(agent.take_rows_to_send(10, destination="a", stream="live", after_id=live_from))
    assert len(live) == 10
    # the backend is killed here; the next one must keep the live rows guarded
    cursors = StreamCursors(MessagingAgent(), "a", newest_first=True)
    assert cursors.live_from == live_from
    assert cursors.order() == ["priority", "live", "data"]
    agent.add_messages([data(i) for i in range(2_010, 3_000)])
    assert set(live) <= set(ids(agent.get_oldest_rows(5_000, destination="a")))


def test_counters_are_recounted_after_an_older_version_wrote_the_queue() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"a": (ALL, 10_000)})
    agent.add_messages([data(i) for i in range(3)])
    for _ in range(4):  # a version before destinations: no counter moves
        agent.connection.execute(
            "INSERT INTO queue (timestamp, variant, config_revision, body) "
            """VALUES (1.0, 'data', 0, '{"variant":"data","data":{"x":1}}')"""
        )
    agent.connection.execute("DELETE FROM queue WHERE id = 1")
    agent.sync_destinations({"a": (ALL, 10_000)})
    assert agent.get_queue_depth("a") == 6


def test_the_first_destination_keeps_what_a_backend_before_destinations_had_in_flight() -> None:
    agent = MessagingAgent()
    agent.add_messages([data(i) for i in range(100)])
    in_flight = ids(agent.take_rows_to_send(100))  # the station-wide mark of an older backend
    agent.sync_destinations({"a": (ALL, 50)})
    agent.add_messages([data(i) for i in range(100, 300)])
    assert set(in_flight) <= set(ids(agent.get_oldest_rows(1_000, destination="a")))
    assert agent.get_dropped_count(destination="a") + agent.get_queue_depth("a") == 300


def test_a_cursor_skips_the_rows_of_other_destinations() -> None:
    agent = MessagingAgent()
    agent.sync_destinations({"all": (ALL, 10_000), "config": (frozenset({"config"}), 10_000)})
    agent.add_messages([data(i) for i in range(500)])
    taken = agent.take_stream_rows(10, destination="config", stream="priority")
    assert taken.rows == [] and taken.looked_up_to == 500
    live = agent.take_stream_rows(10, destination="all", stream="data", up_to=200)
    assert ids(live.rows) == list(range(1, 11)) and live.looked_up_to == 10
    rest = agent.take_stream_rows(1_000, destination="all", stream="data", after_id=10, up_to=200)
    assert len(rest.rows) == 190 and rest.looked_up_to == 200


def test_archiving_never_deletes_a_row_kept_for_a_destination_another_process_added() -> None:
    main_loop = MessagingAgent()
    main_loop.sync_destinations({"a": (frozenset({"data"}), 10_000)})
    backend = MessagingAgent()
    backend.ensure_destination("b", frozenset({"log"}), 10_000)
    backend.add_messages([LogMessageBody(level="INFO", subject="for b", body="")])
    assert main_loop.flush_archive() == 1
    assert backend.get_queue_depth("b") == 1
    assert len(backend.get_oldest_rows(10, destination="b")) == 1
