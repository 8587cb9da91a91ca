"""The backend process: drain the queue to the broker and receive configs.

Loop: take acknowledged publishes and delete their rows; queue received
configs; fetch the oldest rows not yet in flight and publish them in batched
payloads (QoS 1), keeping at most `max_parallel_messages` publishes awaiting
their PUBACK. Rows are deleted only once every publish that carries them is
acknowledged. On teardown: keep draining until the queue is empty or
`max_drain_time` has passed, then disconnect cleanly.
"""

from __future__ import annotations

import json
import time
from multiprocessing.synchronize import Event
from typing import Any

import pydantic

from src.types import Config, ConfigMessageBody, ForeignConfig, redact_secrets
from src.types.config import format_validation_error
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.updater import mark_config_revision_handled

from .mqtt_connection import MQTTConnection
from .provider import Provider, ReceivedConfig, pack_rows

_IDLE_POLL_SECONDS = 0.1  # how soon new rows from the procedures are noticed
_ROWS_PER_FETCH = 1_000


class ConfigReceiver:
    """Judge configs on arrival: invalid ones are rejected at once (with a
    reason naming the field), stale ones and duplicates ignored, valid ones
    queued in the state for the main loop's updater."""

    def __init__(self, config: Config, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Remember the running revision."""
        self.current_revision = config.general.config_revision
        self.logger = logger
        self.messaging_agent = messaging_agent

    def handle(self, received: ReceivedConfig) -> None:
        """Reject, ignore or queue one received config."""
        raw = received.config
        revision = _revision_in(raw)
        if received.error is not None:
            self._reject(raw, revision, received.error)
            return
        try:
            foreign = ForeignConfig.model_validate(raw)
        except pydantic.ValidationError as e:
            self._reject(raw, revision, format_validation_error(e, "received config"))
            return
        revision = foreign.general.config_revision
        state = StateInterface.load()
        newest_known = max(self.current_revision, state.highest_handled_config_revision or -1)
        if revision <= newest_known:
            self.logger.debug(f"ignoring config revision {revision}: not newer than {newest_known}")
            return
        with StateInterface.update() as state:
            if any(p.general.config_revision == revision for p in state.pending_configs):
                return
            state.pending_configs.append(foreign)
        self.logger.info(f"received config revision {revision}; queued for the updater")

    def _reject(self, raw: Any, revision: int | None, reason: str) -> None:
        if revision is not None:
            if revision <= self.current_revision:
                return  # an old, broken config that is still retained somewhere
            if revision <= (StateInterface.load().highest_handled_config_revision or -1):
                return  # rejected already, before a reconnect
            mark_config_revision_handled(revision)
        self.logger.warning(f"rejected a received config (revision {revision})", details=reason)
        version = raw.get("general", {}).get("software_version") if isinstance(raw, dict) else None
        self.messaging_agent.add_message(
            ConfigMessageBody(
                status="rejected",
                config_revision=revision,
                software_version=version if isinstance(version, str) else None,
                reason=reason,
                config=redact_secrets(raw) if isinstance(raw, dict) else {},
            )
        )


def _revision_in(raw: Any) -> int | None:
    general = raw.get("general") if isinstance(raw, dict) else None
    revision = general.get("config_revision") if isinstance(general, dict) else None
    return revision if isinstance(revision, int) and not isinstance(revision, bool) else None


def parse_json_object(payload: bytes, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from a payload, or a clear error naming `what`."""
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{what}: not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"{what}: expected a JSON object, got {type(value).__name__}"
    return value, None


class Drainer:
    """The state of one backend process's drain loop."""

    def __init__(self, config: Config, name: str, provider: Provider) -> None:
        """Open the queue and prepare the connection."""
        assert config.backend is not None
        self.backend = config.backend
        self.logger = Logger(origin=name, config=config)
        self.messaging_agent = MessagingAgent(config)
        self.provider = provider
        self.receiver = ConfigReceiver(config, self.logger, self.messaging_agent)
        self.connection = MQTTConnection(
            self.backend, self.logger, provider.subscriptions(), provider.publishes_on_connect()
        )
        self.rows_of_publish: dict[int, list[int]] = {}
        self.publishes_per_row: dict[int, int] = {}
        self.fetched_up_to = 0  # every row up to here is in flight or deleted
        self.in_flight_above_cursor: set[int] = set()  # only after a refusal rewound it
        self.sent = 0

    def run(self, teardown_indicator: Event) -> None:
        """Drain until the teardown indicator is set and the queue is empty (or
        `max_drain_time` has passed)."""
        self.connection.start()
        deadline: float | None = None
        try:
            while True:
                self._process_acknowledgements()
                self._process_received_configs()
                if deadline is None and teardown_indicator.is_set():
                    deadline = time.time() + self.backend.max_drain_time
                    self.logger.info(
                        f"draining {self.messaging_agent.get_queue_depth()} queued message(s) "
                        f"for at most {self.backend.max_drain_time} s before stopping"
                    )
                if deadline is not None and (self._drained() or time.time() >= deadline):
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

    def _process_acknowledgements(self) -> None:
        finished: list[int] = []
        refused: list[int] = []
        while not self.connection.acknowledged.empty():
            mid, accepted = self.connection.acknowledged.get()
            for row_id in self.rows_of_publish.pop(mid, []):
                if not accepted:
                    refused.append(row_id)
                    continue
                if row_id not in self.publishes_per_row:
                    continue  # another part was refused: the whole row goes out again
                remaining = self.publishes_per_row[row_id] - 1
                if remaining == 0:
                    del self.publishes_per_row[row_id]
                    finished.append(row_id)
                else:
                    self.publishes_per_row[row_id] = remaining
        if finished:
            self.messaging_agent.remove_messages(finished)
            self.sent += len(finished)
        if refused:
            # the broker refused them (MQTT 5 reason code): send them again later
            self.logger.warning(f"the broker refused {len(refused)} message(s); will retry")
            for row_id in refused:
                self.publishes_per_row.pop(row_id, None)
            self.fetched_up_to = min(self.fetched_up_to, min(refused) - 1)
            self.in_flight_above_cursor = {
                row_id for row_id in self.publishes_per_row if row_id > self.fetched_up_to
            }

    def _process_received_configs(self) -> None:
        while not self.connection.received.empty():
            topic, payload = self.connection.received.get()
            received = self.provider.config_in(topic, payload)
            if received is not None:
                self.receiver.handle(received)

    def _publish_more(self) -> bool:
        published_any = False
        while len(self.rows_of_publish) < self.backend.max_parallel_messages:
            rows = self.messaging_agent.get_n_latest_rows(
                _ROWS_PER_FETCH,
                excluded_message_ids=self.in_flight_above_cursor,
                after_id=self.fetched_up_to,
            )
            if not rows:
                break
            # every payload of these rows goes out, even past max_parallel_messages
            # (paho keeps the surplus queued, off the wire): a row is deleted only
            # when each of its parts is acknowledged. Outstanding publishes stay
            # below max_parallel_messages (<= 10,000) plus one fetch, far from the
            # 65,535 message ids MQTT has.
            for publish in pack_rows(
                self.provider,
                rows,
                self.messaging_agent.identifier_of,
                self.backend.max_payload_bytes,
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
