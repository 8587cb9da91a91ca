"""How far a backend has fetched each of its destination's streams from the
queue: its logs and config answers ("priority", sent before the data backlog,
so that an operator hears from a station first), its data, and, during a
newest-first catch-up, the data measured since the catch-up began ("live",
before the backlog). In memory only: the durable marks that keep the size cap
away from rows in flight are the queue's, moved by `take_rows_to_send`.
Used by the drain loop only."""

from __future__ import annotations

from collections.abc import Iterable

from src.utils.messaging_agent import MessagingAgent, QueueRow, Stream

# a backlog at least this long is caught up newest first (when configured)
CATCH_UP_BACKLOG_ROWS = 1_000


class StreamCursors:
    """The fetch cursors of one destination."""

    def __init__(self, agent: MessagingAgent, destination: str, newest_first: bool) -> None:
        """Start every stream at the beginning of the queue; resume a
        newest-first catch-up that an earlier process of this destination left
        unfinished (its live rows in flight stay guarded from the cap)."""
        self.agent = agent
        self.destination = destination
        self.newest_first = newest_first
        self.fetched: dict[Stream, int] = {"priority": 0, "data": 0, "live": 0}
        # rows in flight above a rewound cursor (they must not go out twice)
        self.in_flight_above: dict[Stream, set[int]] = {s: set() for s in self.fetched}
        self.stream_of_row: dict[int, Stream] = {}
        self.live_from = agent.unfinished_live_catch_up(destination)
        if self.live_from is not None:
            self.fetched["live"] = self.live_from

    def begin_catch_up(self) -> None:
        """After a (re)connect: with newest-first catch-up and a backlog, what
        is measured from now on goes before the backlog."""
        if not self.newest_first or self.live_from is not None:
            return
        if self.agent.get_queue_depth(self.destination) < CATCH_UP_BACKLOG_ROWS:
            return
        self.live_from = self.agent.begin_live_catch_up(self.destination)
        self.fetched["live"] = self.live_from

    def order(self) -> list[Stream]:
        """The streams in the order they are served."""
        return ["priority", "live", "data"] if self.live_from is not None else ["priority", "data"]

    def take(self, stream: Stream, n: int, excluded: Iterable[int]) -> list[QueueRow]:
        """The next rows of `stream` not in flight (see `take_rows_to_send`)."""
        rows, looked_up_to = self.agent.take_stream_rows(
            n,
            excluded_message_ids=self.in_flight_above[stream] | set(excluded),
            after_id=self.fetched[stream],
            destination=self.destination,
            stream=stream,
            up_to=self.live_from if stream == "data" else None,
        )
        if not rows:
            # nothing of this stream up to there: the next poll starts after it
            self.fetched[stream] = max(self.fetched[stream], looked_up_to)
        if not rows and stream == "data" and self.live_from is not None:
            self._end_catch_up()
        return rows

    def _end_catch_up(self) -> None:
        """The backlog is out: the live cursor is the data cursor again."""
        self.agent.end_live_catch_up(self.destination)
        self.fetched["data"] = max(self.fetched["data"], self.fetched["live"])
        self.in_flight_above["data"] |= self.in_flight_above["live"]
        for row_id, stream in self.stream_of_row.items():
            if stream == "live":
                self.stream_of_row[row_id] = "data"
        self.in_flight_above["live"] = set()
        self.live_from = None

    def fetched_rows(self, stream: Stream, rows: list[QueueRow]) -> None:
        """Note rows taken from `stream`."""
        for row in rows:
            self.stream_of_row[row.id] = stream
        self.fetched[stream] = max(self.fetched[stream], rows[-1].id)
        above = self.in_flight_above[stream]
        if above and self.fetched[stream] >= max(above):
            self.in_flight_above[stream] = set()

    def done(self, row_id: int) -> None:
        """A row is acknowledged or dropped: forget its stream."""
        self.stream_of_row.pop(row_id, None)

    def rewind(self, row_ids: set[int], still_in_flight: Iterable[int]) -> None:
        """Send these rows again: move each one's stream back before it; the
        rows still in flight above a moved cursor are not fetched twice."""
        for row_id in row_ids:
            stream = self.stream_of_row.get(row_id, "data")
            if stream == "live" and self.live_from is None:
                stream = "data"
            self.fetched[stream] = min(self.fetched[stream], row_id - 1)
        in_flight = set(still_in_flight)
        for stream in self.fetched:
            self.in_flight_above[stream] = {
                row_id
                for row_id in in_flight
                if self.stream_of_row.get(row_id) == stream and row_id > self.fetched[stream]
            }
