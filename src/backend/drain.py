"""The backend process of one destination: drain the queue to its broker and
receive configs.

Loop: release the rows of acknowledged publishes for this destination (a row
leaves the queue once no destination keeps it); queue received configs; fetch
the oldest rows this destination has not got, its logs and config answers
before its data backlog, and publish them in batched payloads (QoS 1), at most
`max_parallel_messages` publishes awaiting their PUBACK and within its rate
limits. A row is released only once every publish that carries it is
acknowledged. When its cap dropped data for it, the destination gets a gap
record once its broker acknowledges again. With failover addresses, the
backend moves to the next address when one does not answer, and back to the
primary once it answers again; what was in flight is sent again (at least
once). On teardown: keep draining until nothing is left for this destination
or `max_drain_time` has passed, then disconnect cleanly.
"""

from __future__ import annotations

import socket
import time
from multiprocessing.synchronize import Event

from src.types import Config, LogMessageBody
from src.types.config import LEGACY_DESTINATION, BackendConfig, destination_of_process
from src.types.state import BackendConnectionState
from src.utils.functions import capped_exponential_delay
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface

from .config_receiver import ConfigReceiver
from .mqtt_connection import RECEIVED_KEPT, MQTTConnection
from .provider import Provider, Publish, pack_rows
from .rate_limit import TokenBucket
from .station_reports import StationReporter, presence
from .streams import StreamCursors

# at teardown, how long a backend waits for a broker it is not connected to
_UNREACHABLE_GRACE_SECONDS = 5.0
_IDLE_POLL_SECONDS = 0.1  # how soon new rows from the procedures are noticed
_ROWS_PER_FETCH = 1_000
_FRUITLESS_DROPS_BEFORE_ISOLATING = 2  # connections lost with no acknowledgement in between
# a connection lost soon after the broker accepted it (as when it hangs up on
# what is sent again) counts as much as this many lost later: a link that
# stalls drops late and at random, a slow upload of the culprit or a broker
# that stalls instead of hanging up drop late too and are still found
_PROMPT_DROP_WEIGHT = 3
_MAX_REFUSAL_BACKOFF = 60.0
# failed connection attempts at one address before the next is tried
_FAILURES_BEFORE_FAILOVER = 2
_GAP_CHECK_SECONDS = 5.0
# received messages judged between two rounds of publishing, at most
_RECEIVED_PER_TURN = 8
_RECEIVED_SECONDS_PER_TURN = 1.0


def destination_section(config: Config, name: str) -> BackendConfig:
    """The backend section of the destination the process `name` serves."""
    return config.destinations()[destination_of_process(name)]


def gap_record(destination: str, count: int, first: float, last: float) -> LogMessageBody:
    """What a destination is told when its cap dropped data for it."""
    span = " and ".join(
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment)) for moment in (first, last)
    )
    return LogMessageBody(
        level="WARNING",
        subject=(
            f"gap: {count} data message(s) measured between {span} were dropped for "
            f"destination {destination} by its size cap and will not arrive here"
        ),
        body=(
            "The station kept measuring while this destination could not take its data; "
            "its queue for this destination was full, so the oldest were dropped. They are "
            "in the station's archive (`ivy messages`)."
        ),
    )


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
        """Open the queue (registering this destination if no main loop has)
        and prepare the connection."""
        self.destination = destination_of_process(name)
        self.backend = destination_section(config, name)
        self.logger = Logger(config, name)
        self.messaging_agent = MessagingAgent(config)
        self.messaging_agent.ensure_destination(
            self.destination, *config.destination_routes()[self.destination]
        )
        self.provider = provider
        self.reporter = (
            StationReporter(config, self.logger, self.messaging_agent)
            if provider.reports_state and self.backend.report_state
            else None
        )
        self.receiver = ConfigReceiver(config, self.logger, self.messaging_agent)
        self.addresses = self.backend.addresses()
        self.address_index = 0
        self.address_note = ""
        self.last_primary_probe = time.monotonic()
        self.connection = self._new_connection()
        self.cursors = StreamCursors(
            self.messaging_agent, self.destination, self.backend.catch_up == "newest_first"
        )
        self.message_rate = TokenBucket(self.backend.max_messages_per_second)
        self.byte_rate = TokenBucket(
            float(self.backend.max_bytes_per_second) if self.backend.max_bytes_per_second else None
        )
        self.waiting: list[Publish] = []  # packed, held back by the rate limits
        self.gap_checked_at = 0.0
        self.rows_of_publish: dict[int, list[int]] = {}
        self.publishes_per_row: dict[int, int] = {}
        self.solo_rows: set[int] = set()  # suspects: each travels alone
        self.poisoned_rows: dict[int, str] = {}  # row -> why it goes out as an error
        self.one_at_a_time = False  # while the culprit of connection drops is sought
        self.seen_disconnects = 0
        self.seen_prompt_disconnects = 0
        self.acknowledged_since_drop = False
        self.fruitless_drops = 0
        self.held_rows: dict[int, float] = {}  # row -> when to try it again
        self.hold_attempts: dict[int, int] = {}
        self.last_acknowledgment: float | None = None
        self.anything_due = False  # whether a row was ever fetched for this destination
        self.published_connection: tuple[object, float | None, bool] | None = None
        self.published_at = 0.0
        self.unexpected_topics: set[str] = set()

    def _new_connection(self, logged_state: str | None = None) -> MQTTConnection:
        self.received_drops_logged = 0
        return MQTTConnection(
            self.backend,
            self.logger,
            self.provider.subscriptions(),
            self.provider.publishes_on_connect(),
            address=self.addresses[self.address_index],
            note=self.address_note,
            logged_state=logged_state,
            presence=(
                presence(self.provider.identifier)
                if self.reporter is not None and self.reporter.enabled
                else None
            ),
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
                self._fail_over()
                self._release_held_rows()
                self._send_gap_record()
                self._publish_connection_state()
                self._report_state()
                if teardown_at is None and teardown_indicator.is_set():
                    teardown_at = time.monotonic()
                    self.logger.info(
                        f"draining {self.messaging_agent.get_queue_depth(self.destination)} "
                        f"queued message(s) for at most {self.backend.max_drain_time} s "
                        "before stopping"
                    )
                if teardown_at is not None and self._done_draining(teardown_at):
                    break
                published = self._publish_more() if self.connection.is_connected() else False
                if not published and not self.connection.received:
                    self.connection.wakeup.wait(_IDLE_POLL_SECONDS)
                    self.connection.wakeup.clear()
        finally:
            self.logger.info(
                f"stopping: {self.messaging_agent.get_queue_depth(self.destination)} message(s) "
                "left in the queue"
            )
            self.connection.stop()

    def _drained(self) -> bool:
        return (
            not self.rows_of_publish
            and not self.waiting
            and self.messaging_agent.get_queue_depth(self.destination) == 0
        )

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
            if self.reporter is not None and self.reporter.acknowledged(mid, refusal):
                continue
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
            self.messaging_agent.acknowledge(self.destination, finished)
            if poisoned:
                self.messaging_agent.count_poisoned(poisoned)
            for row_id in finished:
                self.cursors.done(row_id)
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
            self._hold_back(rows[0], reason)

    def _hold_back(self, row_id: int, reason: str) -> None:
        """A row whose error form fails too: the broker (or the link) refuses
        the station, not the row. It waits, with backoff, while the others
        flow; it is never dropped."""
        attempts = self.hold_attempts[row_id] = self.hold_attempts.get(row_id, 0) + 1
        delay = capped_exponential_delay(attempts, 1.0, _MAX_REFUSAL_BACKOFF)
        self.held_rows[row_id] = time.monotonic() + delay
        self.logger.warning(
            f"even the error form of message {self.messaging_agent.identifier_of(row_id)} "
            f"failed ({reason}); retrying in {delay:.0f} s"
        )

    def _rewind(self, row_ids: set[int]) -> None:
        """Send these rows again: forget their publishes and move their
        streams' fetch cursors back before them."""
        for row_id in row_ids:
            self.publishes_per_row.pop(row_id, None)
        # a late acknowledgement of another part must not count for the resend
        for mid, rows in self.rows_of_publish.items():
            if not row_ids.isdisjoint(rows):
                self.rows_of_publish[mid] = [r for r in rows if r not in row_ids]
        # rows packed but held back by the rate limits are on their way too
        waiting = {row_id for publish in self.waiting for row_id in publish.row_ids}
        self.cursors.rewind(row_ids, set(self.publishes_per_row) | (waiting - row_ids))

    def _process_connection_drops(self) -> None:
        drops = self.connection.disconnects
        if drops == self.seen_disconnects:
            return
        if self.reporter is not None:
            self.reporter.connection_lost()
        if self.acknowledged_since_drop:
            self.fruitless_drops = 0
        self.acknowledged_since_drop = False
        prompt = self.connection.prompt_disconnects
        if self.rows_of_publish:
            new_prompt = prompt - self.seen_prompt_disconnects
            late = drops - self.seen_disconnects - new_prompt
            self.fruitless_drops += _PROMPT_DROP_WEIGHT * new_prompt + late
        self.seen_disconnects = drops
        self.seen_prompt_disconnects = prompt
        if self.fruitless_drops < _FRUITLESS_DROPS_BEFORE_ISOLATING * _PROMPT_DROP_WEIGHT:
            return
        # the broker closes the connection whenever these publishes are resent
        publishes = list(self.rows_of_publish.values())
        self.logger.warning(
            "the broker closed the connection again and again while "
            f"{len(publishes)} publish(es) were outstanding; looking for a poison row "
            "by sending one publish at a time"
        )
        self.fruitless_drops = 0
        if len(publishes) == 1 and len(publishes[0]) == 1 and publishes[0][0] in self.poisoned_rows:
            self._hold_back(publishes[0][0], "the broker closed the connection each time")
        elif len(publishes) == 1:
            self._isolate(publishes[0], "the broker closed the connection each time it was sent")
        else:
            self.solo_rows.update(row_id for rows in publishes for row_id in rows)
        self.one_at_a_time = True
        # a new client: paho would otherwise resend the same publishes for ever
        self._renew_connection()

    def _renew_connection(self) -> None:
        """A new client (at the current address): everything in flight and
        held back is sent again through it."""
        outstanding = set(self.publishes_per_row) | {
            row_id for publish in self.waiting for row_id in publish.row_ids
        }
        self.rows_of_publish = {}
        self.publishes_per_row = {}
        self.waiting = []
        if outstanding:
            self._rewind(outstanding)
        if self.reporter is not None:
            self.reporter.new_connection()
        old = self.connection
        old.stop()
        unlogged_drops = old.received_dropped - self.received_drops_logged
        self.connection = self._new_connection(old.logged_state)
        # what was received and not judged yet is judged through the new one
        self.connection.received.extend(old.received)
        self.connection.received_dropped = unlogged_drops  # its thread is not running yet
        self.seen_disconnects = 0
        self.seen_prompt_disconnects = 0
        self.connection.start()

    def _fail_over(self) -> None:
        """Move to the next address when this one does not answer; while on a
        failover address, go back to the primary as soon as it answers."""
        if len(self.addresses) < 2:
            return
        if (
            not self.connection.is_connected()
            and self.connection.failures >= _FAILURES_BEFORE_FAILOVER
        ):
            failed = self.addresses[self.address_index]
            reason = self.connection.status.detail
            self.address_index = (self.address_index + 1) % len(self.addresses)
            address = self.addresses[self.address_index]
            self.address_note = (
                ""
                if self.address_index == 0
                else f"failover: {failed.mqtt_host}:{failed.mqtt_port} did not answer ({reason})"
            )
            self.logger.warning(
                f"{failed.mqtt_host}:{failed.mqtt_port} does not answer; trying "
                f"{address.mqtt_host}:{address.mqtt_port}"
            )
            self._renew_connection()
            return
        now = time.monotonic()
        if self.address_index == 0 or now - self.last_primary_probe < (
            self.backend.failover_probe_seconds
        ):
            return
        self.last_primary_probe = now
        primary = self.addresses[0]
        try:
            with socket.create_connection((primary.mqtt_host, primary.mqtt_port), timeout=3):
                pass
        except OSError:
            return
        self.logger.info(
            f"the primary address {primary.mqtt_host}:{primary.mqtt_port} answers again; "
            "going back to it (what is in flight is sent again)"
        )
        self.address_index = 0
        self.address_note = ""
        self._renew_connection()

    def _report_state(self) -> None:
        """Presence and state report; while reporting is off, a connection
        without the last will, and with it again once reporting is back."""
        if self.reporter is None:
            return
        self.reporter.tick(self.connection)
        if self.reporter.enabled != (self.connection.presence is not None):
            self._renew_connection()

    def _send_gap_record(self) -> None:
        """Once the broker acknowledges again, tell this destination how much
        data its cap dropped for it (once: the record and the reset of its gap
        are one transaction)."""
        now = time.monotonic()
        if self.last_acknowledgment is None or now - self.gap_checked_at < _GAP_CHECK_SECONDS:
            return
        self.gap_checked_at = now
        count = self.messaging_agent.record_gap(
            self.destination,
            lambda count, first, last: gap_record(self.destination, count, first, last),
        )
        if count:
            self.logger.warning(
                f"told destination {self.destination} of the {count} data message(s) its "
                "size cap dropped for it"
            )

    def _release_held_rows(self) -> None:
        if not self.held_rows:
            return
        now = time.monotonic()
        due = {row_id for row_id, at in self.held_rows.items() if at <= now}
        if due:
            for row_id in due:
                del self.held_rows[row_id]
            self._rewind(due)

    def _process_received_configs(self) -> None:
        """Judge a few of the received messages per turn of the loop: each
        may cost a signature check, and a flood of them must not keep the
        loop from sending data (the rest wait, bounded, for the next turns)."""
        budget_ends = time.monotonic() + _RECEIVED_SECONDS_PER_TURN
        for _ in range(_RECEIVED_PER_TURN):
            if not self.connection.received or time.monotonic() > budget_ends:
                break
            topic, payload = self.connection.received.popleft()
            if not self.provider.expects(topic):
                if topic not in self.unexpected_topics:
                    self.unexpected_topics.add(topic)
                    self.logger.debug(f"ignoring messages on the unexpected topic {topic!r}")
                continue
            received = self.provider.config_in(topic, payload)
            if received is not None:
                self.receiver.handle(received, payload)
        self.receiver.retry_deferred()
        dropped = self.connection.received_dropped - self.received_drops_logged
        if dropped >= 1 and not self.connection.received:
            self.logger.warning(
                f"a flood on the subscribed topics: {dropped} message(s) were pushed out "
                f"unread by newer ones (more than {RECEIVED_KEPT} were waiting)"
            )
            self.received_drops_logged += dropped

    def _publish_connection_state(self) -> None:
        """Write the connection's state into the shared state when it changed
        (and the time of the last acknowledgment at most every few seconds),
        for `ivy status`."""
        status = self.connection.status
        now = time.monotonic()  # a wall clock stepped back must not hold the writes for hours
        # idle: nothing was ever due (a row that was due and is gone from the
        # queue without an acknowledgment must not make the destination idle)
        if not self.anything_due and not self._drained():
            self.anything_due = True
        idle = status.connected and not self.anything_due and self.last_acknowledgment is None
        current = (status, self.last_acknowledgment, idle)
        if current == self.published_connection:
            return
        if self.published_connection is not None and (
            self.published_connection[0::2] == (status, idle) and now - self.published_at < 10
        ):
            return  # only the acknowledgment time moved: not worth a write per batch
        report = BackendConnectionState(
            connected=status.connected,
            detail=status.detail,
            since=status.since,
            broker=status.broker,
            last_acknowledgment=self.last_acknowledgment,
            idle=idle,
        )
        with StateInterface.update() as state:
            state.destinations = {**state.destinations, self.destination: report}
            if self.destination == LEGACY_DESTINATION:
                # what versions before destinations (a guard judging this one) read
                state.backend_connection = report
        self.published_connection = current
        self.published_at = now

    def _publish_more(self) -> bool:
        """Publish what is waiting for the rate limits, then fetch and publish
        more, stream by stream, while the in-flight window allows."""
        published_any = self._send_waiting()
        limit = 1 if self.one_at_a_time else self.backend.max_parallel_messages
        if not published_any and not self.rows_of_publish:
            self.cursors.begin_catch_up()
        for stream in self.cursors.order():
            while len(self.rows_of_publish) < limit and not self.waiting:
                rows = self.cursors.take(
                    stream, 1 if self.one_at_a_time else _ROWS_PER_FETCH, self.held_rows.keys()
                )
                if not rows:
                    break
                self.anything_due = True
                self.cursors.fetched_rows(stream, rows)
                # every payload of these rows goes out, even past the limit (paho
                # keeps the surplus queued, off the wire): a row is released only
                # when each of its parts is acknowledged. Outstanding publishes
                # stay below max_parallel_messages (<= 10,000) plus one fetch, far
                # from the 65,535 message ids MQTT has.
                self.waiting = pack_rows(
                    self.provider,
                    rows,
                    self.messaging_agent.identifier_of,
                    self.solo_rows,
                    self.poisoned_rows,
                )
                published_any = self._send_waiting() or published_any
        if not published_any and not self.rows_of_publish and self.one_at_a_time:
            self.logger.info("every suspect row is out; back to batched publishing")
            self.one_at_a_time = False
            self.solo_rows.clear()
        return published_any

    def _send_waiting(self) -> bool:
        """Publish the packed publishes the rate limits let through now."""
        sent = 0
        for publish in self.waiting:
            payload = publish.payload()
            if not (
                self.message_rate.allows(len(publish.row_ids))
                and self.byte_rate.allows(len(payload))
            ):
                break
            self.message_rate.spend(len(publish.row_ids))
            self.byte_rate.spend(len(payload))
            mid = self.connection.publish(publish.topic, payload)
            self.rows_of_publish[mid] = publish.row_ids
            for row_id in publish.row_ids:
                self.publishes_per_row[row_id] = self.publishes_per_row.get(row_id, 0) + 1
            sent += 1
        self.waiting = self.waiting[sent:]
        return sent > 0


def run_backend(config: Config, name: str, teardown_indicator: Event, provider: Provider) -> None:
    """Run one backend process until teardown. Called by each provider's `run`."""
    Drainer(config, name, provider).run(teardown_indicator)
