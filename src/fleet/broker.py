"""The operator's connection to the fleet's broker: a persistent session (so
that answers published while the operator's laptop sleeps wait for it) that
collects every station's retained state report and presence, the retained
configs on `configurations/<id>` (what a halt puts back) and the stations'
acknowledgments. paho's network thread only fills the tables; readers take
copies under a lock."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pydantic
from paho.mqtt.enums import MQTTErrorCode

from src.types.config import BrokerConnection, is_valid_revision
from src.types.fleet import StationReport
from src.utils.mqtt_client import connect_arguments, new_mqtt_client

SUBSCRIPTIONS = ("ivy/+/state", "ivy/+/presence", "configurations/+", "acknowledgments/+")
_PUBLISH_TIMEOUT_SECONDS = 30.0
# a station's answers kept per station (newest last)
_ANSWERS_KEPT = 64


class FleetBrokerError(Exception):
    """The broker cannot be reached or refused us; the message says why."""


@dataclass(frozen=True)
class Answer:
    """One acknowledgment a station published (Tenta's format)."""

    revision: int
    success: bool
    received_at: float


@dataclass
class Sightings:
    """What the broker told us about one station."""

    report: StationReport | None = None
    online: bool | None = None
    presence_at: float | None = None
    retained_config: bytes | None = None
    answers: list[Answer] = field(default_factory=list)


class FleetBroker:
    """A connected fleet client. Use as a context manager."""

    def __init__(
        self, settings: BrokerConnection, stations: list[str], session: str | None = None
    ) -> None:
        """Prepare a client for `stations` (others' messages are ignored):
        with the inventory's client id and its persistent session (a
        rollout's: answers wait there while the operator is away), or with a
        clean session of its own (`session`: a suffix to the client id) for
        a command that must not take the rollout's session over."""
        self.settings = settings
        self.stations = set(stations)
        client_id = settings.mqtt_client_id
        if session is not None:
            client_id = f"{client_id[: 64 - len(session) - 1]}-{session}"
        self.persistent = session is None
        self.client = new_mqtt_client(settings, client_id, self.persistent)
        # a hostile retained message must never end paho's thread
        self.client.suppress_exceptions = True
        self.lock = threading.Lock()
        self.sightings: dict[str, Sightings] = {s: Sightings() for s in stations}
        self.config_messages: dict[str, int] = {}  # messages seen on each config topic
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.refusal: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def __enter__(self) -> FleetBroker:
        """Connect and subscribe; raise `FleetBrokerError` if that fails."""
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 20.0) -> None:
        """Connect, subscribe, and wait until the broker confirmed the
        subscriptions (its retained messages follow them)."""
        clean_start, properties = connect_arguments(self.settings, self.persistent)
        try:
            self.client.connect(
                self.settings.mqtt_host,
                self.settings.mqtt_port,
                keepalive=30,
                clean_start=clean_start,
                properties=properties,
            )
        except (OSError, ValueError) as e:
            raise FleetBrokerError(
                f"cannot reach the broker {self.settings.mqtt_host}:{self.settings.mqtt_port}: {e}"
            ) from None
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.close()
            why = self.refusal or "no answer"
            raise FleetBrokerError(
                f"the broker {self.settings.mqtt_host}:{self.settings.mqtt_port} did not take "
                f"our subscriptions within {timeout:.0f} s ({why})"
            )

    def close(self) -> None:
        """Disconnect (the session stays with the broker) and stop the thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def settle(self, seconds: float = 5.0) -> None:
        """Give the broker time to deliver the retained messages and what the
        session queued: until every station was heard of, or `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.lock:
                if all(s.report is not None or s.online is False for s in self.sightings.values()):
                    return
            time.sleep(0.05)

    def seen(self, station: str) -> Sightings:
        """A copy of what is known of `station`."""
        with self.lock:
            sightings = self.sightings[station]
            return dataclasses.replace(sightings, answers=list(sightings.answers))

    def publish_config(self, station: str, payload: bytes) -> None:
        """Make `payload` the retained message on `configurations/<station>`
        (empty: none) and wait until the broker delivered it back to us;
        `FleetBrokerError` when it does not. QoS 0, so that the broker keeps
        no copy for a station that is away in its session: what such a
        station gets when it returns is what is retained then, so a halt that
        replaces it reaches it too (a QoS 1 copy queued in its session would
        not be replaced)."""
        topic = f"configurations/{station}"
        with self.lock:
            seen_before = self.config_messages.get(station, 0)
        info = self.client.publish(topic, payload, qos=0, retain=True)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise FleetBrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + _PUBLISH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                echoed = self.config_messages.get(station, 0) > seen_before
                if echoed and self.sightings[station].retained_config == (payload or None):
                    return
            time.sleep(0.02)
        raise FleetBrokerError(
            f"the broker did not deliver our publish to {topic} back within "
            f"{_PUBLISH_TIMEOUT_SECONDS:.0f} s"
        )

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: object,
        properties: object,
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            self.refusal = f"the broker refused the connection: {reason_code}"
            return
        self.connected.set()
        client.subscribe([(topic, 1) for topic in SUBSCRIPTIONS])

    def _on_subscribe(self, client: mqtt.Client, *args: object) -> None:
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, *args: object) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._take(message)
        except Exception:  # whatever a station (or anyone) publishes: ignored
            return

    def _take(self, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        station = parts[1] if parts[0] == "ivy" and len(parts) == 3 else parts[-1]
        if station not in self.stations:
            return
        payload = bytes(message.payload)
        now = time.time()
        with self.lock:
            sightings = self.sightings[station]
            if parts[0] == "ivy" and parts[2] == "state":
                try:
                    report = StationReport.model_validate_json(payload)
                except pydantic.ValidationError:
                    return  # a station of another version, or not a station at all
                if report.station == station:
                    sightings.report = report
            elif parts[0] == "ivy" and parts[2] == "presence":
                try:
                    presence = json.loads(payload)
                except ValueError:
                    return
                if isinstance(presence, dict) and isinstance(presence.get("online"), bool):
                    sightings.online = presence["online"]
                    at = presence.get("at")
                    sightings.presence_at = (
                        float(at)
                        if isinstance(at, (int, float)) and 0 < at < 2**33 and at == at
                        else now
                    )
            elif parts[0] == "configurations" and len(parts) == 2:
                sightings.retained_config = payload or None
                self.config_messages[station] = self.config_messages.get(station, 0) + 1
            elif parts[0] == "acknowledgments" and len(parts) == 2:
                sightings.answers = [*sightings.answers, *_answers_in(payload, now)][
                    -_ANSWERS_KEPT:
                ]


def _answers_in(payload: bytes, now: float) -> list[Answer]:
    """The acknowledgments in one Tenta payload (a JSON array); anything
    else is ignored."""
    try:
        items = json.loads(payload)
    except (ValueError, RecursionError):
        return []
    found = []
    for item in items if isinstance(items, list) else []:
        if (
            isinstance(item, dict)
            and is_valid_revision(item.get("revision"))
            and isinstance(item.get("success"), bool)
        ):
            found.append(Answer(item["revision"], item["success"], now))
    return found
