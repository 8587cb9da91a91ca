"""The backend process: drain the queue to the broker and receive configs.

Loop: take acknowledged publishes and delete their rows; queue received
configs; fetch the oldest rows not yet in flight and publish them in batched
payloads (QoS 1), keeping at most `max_parallel_messages` publishes awaiting
their PUBACK. Rows are deleted only once every publish that carries them is
acknowledged. On teardown: keep draining until the queue is empty or
`max_drain_time` has passed, then disconnect cleanly.
"""

from __future__ import annotations

import time
from multiprocessing.synchronize import Event

from src.types import Config
from src.types.state import BackendConnectionState
from src.utils.functions import capped_exponential_delay
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface

from .config_receiver import ConfigReceiver
from .mqtt_connection import MQTTConnection
from .provider import Provider, pack_rows

# at teardown, how long a backend waits for a broker it is not connected to
_UNREACHABLE_GRACE_SECONDS = 5.0
_IDLE_POLL_SECONDS = 0.1  # how soon new rows from the procedures are noticed
_ROWS_PER_FETCH = 1_000
_FRUITLESS_DROPS_BEFORE_ISOLATING = 2  # connections lost with no acknowledgement in between
_MAX_REFUSAL_BACKOFF = 60.0


class Drainer:
    """The state of one backend process's drain loop.

    Poison rows: a publish the broker refuses (an MQTT 5 PUBACK reason code)
    has its rows sent again, each in a publish of its own; a row refused alone
    goes out as an error holding its raw body, in small parts; if that is
    refused too, the broker refuses us rather than the row: the row is held
    back and retried with backoff while the others flow. A broker that closes
    the connection again and again while the same publishes are outstanding
    (a packet above its size limit, a payload it cannot convert) is handled
    alike: the connection is renewed without paho's resend queue, and the
    outstanding rows are sent one publish at a time until the culprit is
    found; if even its error form closes the connection, the row is dropped
    from the queue (it stays in the archive). Poison rows are counted in the
    queue's `poisoned` counter.
    """

    def __init__(self, config: Config, name: str, provider: Provider) -> None:
        """Open the queue and prepare the connection."""
        assert config.backend is not None
        self.backend = config.backend
        self.logger = Logger(config, name)
        self.messaging_agent = MessagingAgent(config)
        self.provider = provider
        self.receiver = ConfigReceiver(config, self.logger, self.messaging_agent)
        self.connection = self._new_connection()
        self.rows_of_publish: dict[int, list[int]] = {}
        self.publishes_per_row: dict[int, int] = {}
        self.fetched_up_to = 0  # every row up to here is in flight or deleted
        self.in_flight_above_cursor: set[int] = set()  # only after a rewind
        self.solo_rows: set[int] = set()  # suspects: each travels alone
        self.poisoned_rows: dict[int, str] = {}  # row -> why it goes out as an error
        self.one_at_a_time = False  # while the culprit of connection drops is sought
        self.seen_disconnects = 0
        self.acknowledged_since_drop = False
        self.fruitless_drops = 0
        self.held_rows: dict[int, float] = {}  # row -> when to try it again
        self.hold_attempts: dict[int, int] = {}
        self.last_acknowledgment: float | None = None
        self.published_connection: tuple[object, float | None] | None = None
        self.published_at = 0.0
        self.unexpected_topics: set[str] = set()

    def _new_connection(self) -> MQTTConnection:
        return MQTTConnection(
            self.backend,
            self.logger,
            self.provider.subscriptions(),
            self.provider.publishes_on_connect(),
        )

    def run(self, teardown_indicator: Event) -> None:
        """Drain until the teardown indicator is set and the queue is empty (or
        `max_drain_time` has passed)."""
        self.connection.start()
        teardown_at: float | None = None
        try:
            while True:
                self._process_acknowledgements()
                self._process_received_configs()
                self._process_connection_drops()
                self._release_held_rows()
                self._publish_connection_state()
                if teardown_at is None and teardown_indicator.is_set():
                    teardown_at = time.monotonic()
                    self.logger.info(
                        f"draining {self.messaging_agent.get_queue_depth()} queued message(s) "
                        f"for at most {self.backend.max_drain_time} s before stopping"
                    )
                if teardown_at is not None and self._done_draining(teardown_at):
                    break
                published = self._publish_more() if self.connection.is_connected() else False
                if not published:
                    self.connection.wakeup.wait(_IDLE_POLL_SECONDS)
                    self.connection.wakeup.clear()
        finally:
            self.logger.info(
                f"stopping: {self.messaging_agent.get_queue_depth()} message(s) left in the queue"
            )
            self.connection.stop()

    def _drained(self) -> bool:
        return not self.rows_of_publish and self.messaging_agent.get_queue_depth() == 0

    def _done_draining(self, teardown_at: float) -> bool:
        """Whether to stop now: everything is sent, `max_drain_time` is over,
        or no broker has answered for a short grace (draining into a broker
        that is not there only delays the next backend, say the previous
        config's after a failed trial; the rows stay queued for it)."""
        waited = time.monotonic() - teardown_at
        if self._drained() or waited >= self.backend.max_drain_time:
            return True
        if not self.connection.is_connected() and waited >= _UNREACHABLE_GRACE_SECONDS:
            self.logger.info("not connected to the broker: the rest stays queued")
            return True
        return False

    def _process_acknowledgements(self) -> None:
        finished: list[int] = []
        refused: dict[int, str] = {}
        while not self.connection.acknowledged.empty():
            mid, refusal = self.connection.acknowledged.get()
            rows = self.rows_of_publish.pop(mid, [])
            if refusal is not None:
                self._isolate(rows, f"the broker refused it: {refusal}")
                refused.update(dict.fromkeys(rows, refusal))
                continue
            self.acknowledged_since_drop = True
            for row_id in rows:
                if row_id not in self.publishes_per_row:
                    continue  # another part was refused: the whole row goes out again
                remaining = self.publishes_per_row[row_id] - 1
                if remaining == 0:
                    del self.publishes_per_row[row_id]
                    finished.append(row_id)
                else:
                    self.publishes_per_row[row_id] = remaining
        if finished:
            self.last_acknowledgment = time.time()
            poisoned = sum(1 for row_id in finished if row_id in self.poisoned_rows)
            self.messaging_agent.remove_messages(finished)
            if poisoned:
                self.messaging_agent.count_poisoned(poisoned)
            for row_id in finished:
                self.solo_rows.discard(row_id)
                self.poisoned_rows.pop(row_id, None)
                self.hold_attempts.pop(row_id, None)
        if refused:
            reasons = ", ".join(sorted(set(refused.values())))
            self.logger.warning(
                f"the broker refused {len(refused)} message(s) ({reasons}); "
                "sending them again one by one"
            )
            self._rewind(set(refused))

    def _isolate(self, rows: list[int], reason: str) -> None:
        """Rows of a publish that failed: several travel alone next time; a
        lone one goes out as an error; a lone error refused too means the
        broker refuses us, not the row: that row is held back and retried with
        backoff, while the others flow."""
        if len(rows) != 1 or rows[0] not in self.solo_rows:
            self.solo_rows.update(rows)
        elif rows[0] not in self.poisoned_rows:
            self.poisoned_rows[rows[0]] = reason
            self.logger.error(
                f"message {self.messaging_agent.identifier_of(rows[0])} is a poison row "
                f"({reason}); sending it as an error holding its raw content"
            )
        else:
            attempts = self.hold_attempts[rows[0]] = self.hold_attempts.get(rows[0], 0) + 1
            delay = capped_exponential_delay(attempts, 1.0, _MAX_REFUSAL_BACKOFF)
            self.held_rows[rows[0]] = time.monotonic() + delay
            self.logger.warning(
                f"the broker refuses even the error form of message "
                f"{self.messaging_agent.identifier_of(rows[0])} ({reason}); "
                f"retrying in {delay:.0f} s"
            )

    def _rewind(self, row_ids: set[int]) -> None:
        """Send these rows again: forget their publishes and move the fetch
        cursor back before them."""
        for row_id in row_ids:
            self.publishes_per_row.pop(row_id, None)
        # a late acknowledgement of another part must not count for the resend
        for mid, rows in self.rows_of_publish.items():
            if not row_ids.isdisjoint(rows):
                self.rows_of_publish[mid] = [r for r in rows if r not in row_ids]
        self.fetched_up_to = min(self.fetched_up_to, min(row_ids) - 1)
        self.in_flight_above_cursor = {
            row_id for row_id in self.publishes_per_row if row_id > self.fetched_up_to
        }

    def _process_connection_drops(self) -> None:
        drops = self.connection.disconnects
        if drops == self.seen_disconnects:
            return
        if self.acknowledged_since_drop:
            self.fruitless_drops = 0
        self.acknowledged_since_drop = False
        if self.rows_of_publish:
            self.fruitless_drops += drops - self.seen_disconnects
        self.seen_disconnects = drops
        if self.fruitless_drops < _FRUITLESS_DROPS_BEFORE_ISOLATING:
            return
        # the broker closes the connection whenever these publishes are resent
        outstanding = list(self.publishes_per_row)
        publishes = list(self.rows_of_publish.values())
        self.logger.warning(
            f"the broker closed the connection {self.fruitless_drops} times while "
            f"{len(publishes)} publish(es) were outstanding; looking for a poison row "
            "by sending one publish at a time"
        )
        self.fruitless_drops = 0
        if len(publishes) == 1 and len(publishes[0]) == 1 and publishes[0][0] in self.poisoned_rows:
            self._drop_poison_row(publishes[0][0])
        elif len(publishes) == 1:
            self._isolate(publishes[0], "the broker closed the connection each time it was sent")
        else:
            self.solo_rows.update(row_id for rows in publishes for row_id in rows)
        self.one_at_a_time = True
        self.rows_of_publish = {}
        self.publishes_per_row = {}
        if outstanding:
            self._rewind(set(outstanding))
        # a new client: paho would otherwise resend the same publishes for ever
        self._process_received_configs()
        self.connection.stop()
        self.connection = self._new_connection()
        self.seen_disconnects = 0
        self.connection.start()

    def _release_held_rows(self) -> None:
        if not self.held_rows:
            return
        now = time.monotonic()
        due = {row_id for row_id, at in self.held_rows.items() if at <= now}
        if due:
            for row_id in due:
                del self.held_rows[row_id]
            self._rewind(due)

    def _drop_poison_row(self, row_id: int) -> None:
        identifier = self.messaging_agent.identifier_of(row_id)
        self.logger.error(
            f"message {identifier} makes the broker close the connection even as an error; "
            "dropped from the queue (it stays in the local archive)"
        )
        self.messaging_agent.remove_messages([row_id])
        self.messaging_agent.count_poisoned(1)
        self.solo_rows.discard(row_id)
        self.poisoned_rows.pop(row_id, None)
        self.held_rows.pop(row_id, None)
        self.hold_attempts.pop(row_id, None)

    def _process_received_configs(self) -> None:
        while not self.connection.received.empty():
            topic, payload = self.connection.received.get()
            if not self.provider.expects(topic):
                if topic not in self.unexpected_topics:
                    self.unexpected_topics.add(topic)
                    self.logger.debug(f"ignoring messages on the unexpected topic {topic!r}")
                continue
            received = self.provider.config_in(topic, payload)
            if received is not None:
                self.receiver.handle(received, payload)

    def _publish_connection_state(self) -> None:
        """Write the connection's state into the shared state when it changed
        (and the time of the last acknowledgment at most every few seconds),
        for `ivy status`."""
        status = self.connection.status
        now = time.monotonic()  # a wall clock stepped back must not hold the writes for hours
        current = (status, self.last_acknowledgment)
        if current == self.published_connection:
            return
        if self.published_connection is not None and (
            self.published_connection[0] == status and now - self.published_at < 10
        ):
            return  # only the acknowledgment time moved: not worth a write per batch
        with StateInterface.update() as state:
            state.backend_connection = BackendConnectionState(
                connected=status.connected,
                detail=status.detail,
                since=status.since,
                broker=status.broker,
                last_acknowledgment=self.last_acknowledgment,
            )
        self.published_connection = current
        self.published_at = now

    def _publish_more(self) -> bool:
        published_any = False
        limit = 1 if self.one_at_a_time else self.backend.max_parallel_messages
        while len(self.rows_of_publish) < limit:
            rows = self.messaging_agent.take_rows_to_send(
                1 if self.one_at_a_time else _ROWS_PER_FETCH,
                excluded_message_ids=self.in_flight_above_cursor | self.held_rows.keys(),
                after_id=self.fetched_up_to,
            )
            if not rows:
                if not self.rows_of_publish and self.one_at_a_time:
                    self.logger.info("every suspect row is out; back to batched publishing")
                    self.one_at_a_time = False
                    self.solo_rows.clear()
                break
            # every payload of these rows goes out, even past the limit (paho
            # keeps the surplus queued, off the wire): a row is deleted only
            # when each of its parts is acknowledged. Outstanding publishes
            # stay below max_parallel_messages (<= 10,000) plus one fetch, far
            # from the 65,535 message ids MQTT has.
            for publish in pack_rows(
                self.provider,
                rows,
                self.messaging_agent.identifier_of,
                self.solo_rows,
                self.poisoned_rows,
            ):
                mid = self.connection.publish(publish.topic, publish.payload())
                self.rows_of_publish[mid] = publish.row_ids
                for row_id in publish.row_ids:
                    self.publishes_per_row[row_id] = self.publishes_per_row.get(row_id, 0) + 1
            self.fetched_up_to = max(self.fetched_up_to, rows[-1].id)
            if self.in_flight_above_cursor and self.fetched_up_to >= max(
                self.in_flight_above_cursor
            ):
                self.in_flight_above_cursor = set()
            published_any = True
        return published_any


def run_backend(config: Config, name: str, teardown_indicator: Event, provider: Provider) -> None:
    """Run one backend process until teardown. Called by each provider's `run`."""
    Drainer(config, name, provider).run(teardown_indicator)
