"""The one MQTT connection layer every provider uses (paho-mqtt 2.x).

Persistent session, subscriptions renewed in `on_connect` (so they survive
reconnects), TLS, and reconnection with capped exponential backoff and full
jitter inside the process: a broker outage is not a crash, and a thousand
stations behind a broker that restarts do not all come back in the same
second. Connection problems are logged once
per change of state, not once per retry. paho's network thread only puts
events on queues; the backend's own thread does all the work.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from src.types import BackendConfig
from src.types.config import BrokerAddress
from src.utils.logger import Logger
from src.utils.mqtt_client import connect_arguments, new_mqtt_client

_KEEPALIVE_SECONDS = 30
# the n-th retry waits a random time in [_RECONNECT_MIN_DELAY, min(cap, 2**n)]
_RECONNECT_MIN_DELAY = 0.5
# a broker that hangs up this soon after its CONNACK did not like the session
_SOON_AFTER_CONNACK_SECONDS = 2.0
# at a clean stop, how long the offline presence may take to be acknowledged
_PRESENCE_WAIT_SECONDS = 2.0
# received messages waiting for the backend's thread (configs are few; more is a flood)
RECEIVED_KEPT = 256


@dataclass(frozen=True)
class Presence:
    """A retained presence topic: `online()` said by its owner after each
    connect, `offline` at a clean stop and as the last will."""

    topic: str
    online: Callable[[], bytes]
    offline: bytes


@dataclass(frozen=True)
class ConnectionStatus:
    """The connection's state as last logged, for `ivy status`."""

    connected: bool
    detail: str
    since: float
    broker: str


class MQTTConnection:
    """A paho client wired for Ivy. Used by the backend process only."""

    def __init__(
        self,
        config: BackendConfig,
        logger: Logger,
        subscriptions: Sequence[str],
        publishes_on_connect: Sequence[tuple[str, bytes]] = (),
        address: BrokerAddress | None = None,
        note: str = "",
        presence: Presence | None = None,
        logged_state: str | None = None,
    ) -> None:
        """Configure (but do not connect) the client, for `address` (default:
        the primary); `note` says why this address, in the connection's status.
        `publishes_on_connect` go out after each connect; `presence`, if
        given, is the retained last will (offline when the station vanishes)
        and said offline at a clean stop (its owner says online)."""
        self.presence = presence
        self.config = config
        self.host, self.port = (
            (address.mqtt_host, address.mqtt_port)
            if address is not None
            else (config.mqtt_host, config.mqtt_port)
        )
        self.note = note
        self.logger = logger
        self.subscriptions = list(subscriptions)
        self.publishes_on_connect = list(publishes_on_connect)
        # events from paho's network thread, consumed by the backend's thread
        # (message id, None when accepted or the broker's refusal reason)
        self.acknowledged: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()
        # the newest messages on the subscribed topics, bounded: a flood must
        # not grow the backend (a retained config comes again at the next
        # connection); how many were pushed out is counted
        self.received: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=RECEIVED_KEPT
        )
        self.received_dropped = 0
        self.wakeup = threading.Event()
        self._connected = threading.Event()
        self._connected_at = 0.0
        self._refused = False
        # what the connection this one replaces logged last (not logged twice)
        self._last_state: str | None = logged_state
        self.status = ConnectionStatus(
            connected=False, detail="connecting", since=time.time(), broker=self.address
        )
        self.disconnects = 0  # connections lost after the broker had accepted them
        # of those, the ones lost soon after the broker accepted them (when
        # paho sends again what was in flight): a row the broker will not
        # take shows itself that way, a flaky link rarely does
        self.prompt_disconnects = 0
        self.refusals = 0  # CONNACKs with a failure

        self.client = new_mqtt_client(config)
        if presence is not None:
            # retained: whoever subscribes later still learns the station vanished
            self.client.will_set(presence.topic, presence.offline, qos=1, retain=True)
        self.client.max_inflight_messages_set(config.max_parallel_messages)
        self.client.max_queued_messages_set(0)  # unbounded: the drain loop bounds it
        self._failures = 0
        self._random = random.Random()
        self._next_reconnect_delay()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def _next_reconnect_delay(self) -> None:
        """Tell paho how long to wait before its next attempt: full jitter over
        a window that doubles with each failure up to the configured cap."""
        window = min(float(self.config.reconnect_max_seconds), 2.0 ** min(self._failures, 16))
        delay = self._random.uniform(_RECONNECT_MIN_DELAY, max(window, _RECONNECT_MIN_DELAY))
        # paho waits its minimum after this call; floats work, its hint says int
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        self._failures += 1

    @property
    def logged_state(self) -> str | None:
        """The state this connection logged last (a replacement does not log
        the same again)."""
        return self._last_state

    @property
    def address(self) -> str:
        """host:port of the broker, for log lines."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Connect in the background; paho's thread retries until it succeeds."""
        clean_start, properties = connect_arguments(self.config)
        self.client.connect_async(
            self.host,
            self.port,
            keepalive=_KEEPALIVE_SECONDS,
            clean_start=clean_start,
            properties=properties,
        )
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (saying offline first, as a clean disconnect
        discards the last will) and stop paho's thread."""
        if self.presence is not None and self.is_connected():
            info = self.client.publish(
                self.presence.topic, self.presence.offline, qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(_PRESENCE_WAIT_SECONDS)
        self.client.disconnect()
        self.client.loop_stop()

    def is_connected(self) -> bool:
        """Whether the broker has accepted our connection right now."""
        return self._connected.is_set()

    @property
    def failures(self) -> int:
        """Connection attempts that failed since the last one that succeeded."""
        return self._failures - 1  # the count is ahead by the wait it has set

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish with QoS 1 and return the message id; paho keeps the message
        (and resends it after a reconnect) until its PUBACK arrives."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info.mid

    def _log_state(
        self, state: str, failure: bool, details: Callable[[], str] | None = None
    ) -> None:
        """Log a change of connection state once (not once per retry) and keep
        it for `ivy status`."""
        if state == self._last_state:
            return
        self._last_state = state
        if details is not None:
            state += f" ({details()})"
        if self.note:
            state += f"; {self.note}"
        self.status = ConnectionStatus(
            connected=not failure, detail=state, since=time.time(), broker=self.address
        )
        if failure:
            self.logger.warning(
                f"MQTT {state}; retrying with backoff up to {self.config.reconnect_max_seconds} s"
            )
        else:
            self.logger.info(f"MQTT {state}")

    def _protocol_hint(self) -> str:
        if self.config.mqtt_protocol == "5":
            return (
                "; MQTT 5 was tried: if the broker speaks only 3.1.1 (RabbitMQ before 3.13, "
                'older brokers), set backend.mqtt_protocol to "3.1.1"'
            )
        return "; MQTT 3.1.1 was tried"

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = True
            self.refusals += 1
            self._log_state(f"broker {self.address} refused the connection: {reason_code}", True)
            return
        self._refused = False
        self._connected_at = time.monotonic()
        self._failures = 0
        self._next_reconnect_delay()
        self._connected.set()
        self._log_state(f"connected to {self.address}", False)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        for topic, payload in self.publishes_on_connect:
            client.publish(topic, payload, qos=1)
        self.wakeup.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._next_reconnect_delay()
        # the probe runs only when the state changes, not on every retry
        self._log_state(f"cannot reach the broker at {self.address}", True, self._diagnose)

    def _diagnose(self) -> str:
        """Why a connection fails: paho's callback does not say, and "wrong CA"
        and "host down" need different fixes."""
        try:
            with socket.create_connection((self.host, self.port), timeout=5) as raw:
                context = self.client._ssl_context
                if context is not None:
                    with context.wrap_socket(raw, server_hostname=self.host):
                        pass
        except OSError as e:
            return str(e) or type(e).__name__
        return "the broker accepts TCP connections; the MQTT handshake failed"

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._next_reconnect_delay()
        if was_connected:
            prompt = (
                reason_code.is_failure
                and time.monotonic() - self._connected_at < _SOON_AFTER_CONNACK_SECONDS
            )
            # the backend's thread reads disconnects, then prompt_disconnects
            if prompt:
                self.prompt_disconnects += 1
            self.disconnects += 1
            if not reason_code.is_failure:
                return  # we disconnected
            if prompt:
                self._log_state(
                    f"broker {self.address} closed the connection right after accepting it "
                    f"({reason_code}){self._protocol_hint()}",
                    True,
                )
            else:
                self._log_state(f"lost the connection to {self.address}: {reason_code}", True)
        elif not self._refused:
            # paho reports no connect failure for this: without a log line the
            # station would retry in silence for ever
            self._log_state(
                f"broker {self.address} closed the connection before accepting it "
                f"({reason_code}){self._protocol_hint()}",
                True,
            )

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # MQTT 5 brokers can refuse a publish in its PUBACK
        self.acknowledged.put((mid, str(reason_code) if reason_code.is_failure else None))
        self.wakeup.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if len(self.received) == RECEIVED_KEPT:
            self.received_dropped += 1  # only this thread writes it
        self.received.append((message.topic, bytes(message.payload)))
        self.wakeup.set()
