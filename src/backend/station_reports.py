"""The station's state report and presence for `ivy fleet` (see
`src.types.fleet`), published by a Tenta backend next to its data: the
report at once when it changes (checked every few seconds) and every few
minutes anyway, retained, so that an operator sees every station at once
without asking any of them.

A broker whose ACL refuses these topics must not cost the data anything:
a report the broker refuses (an MQTT 5 reason code) turns reporting off for
an hour, and so do connection losses while a report was outstanding, twice
in a row with no report acknowledged in between (brokers that close the
connection on a denied publish); meanwhile the connection has no last will.
(Mosquitto takes a connection whose last will its ACL denies and drops the
will; a broker that refuses such connections needs `report_state: false`.)"""

from __future__ import annotations

import json
import time

from src.types import Config
from src.types.config import mask_secrets, secret_values, without_url_credentials
from src.types.fleet import (
    MAX_PROBLEMS,
    ConfigAnswerReport,
    RefusalReport,
    StationReport,
    clipped,
    presence_payload,
    presence_topic,
    state_topic,
)
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.station_status import collect_status, health_problems

from .mqtt_connection import MQTTConnection, Presence

CHECK_SECONDS = 5.0
REFRESH_SECONDS = 300.0
_STRIKES = 2  # connection drops while a report was outstanding, or refused connections
RETRY_SECONDS = 3_600.0


def station_report(config: Config, agent: MessagingAgent | None = None) -> StationReport:
    """The station's state now, as `ivy status` judges it (its default
    thresholds), bounded in size, every text with the config's secrets and
    URL credentials masked (a child's last error may quote either)."""
    secrets = secret_values(json.loads(config.to_json(reveal_secrets=True)))

    def masked(text: str | None) -> str | None:
        if text is None:
            return None
        return clipped(mask_secrets(without_url_credentials(text), secrets))

    status = collect_status(agent)
    problems = health_problems(status)
    state = StateInterface.load()
    outcome = state.config_outcomes[-1] if state.config_outcomes else None
    refusal = state.last_refused_config
    return StationReport(
        station=config.general.system_identifier,
        version=status.version,
        config_revision=status.config.revision,
        running=status.running,
        healthy=status.running and not problems,
        problems=[masked(p) or "" for p in problems[:MAX_PROBLEMS]],
        backlog=status.queue.depth,
        oldest_unsent_age_seconds=status.queue.oldest_age_seconds,
        last_config=None
        if outcome is None
        else ConfigAnswerReport(
            revision=outcome.config_revision,
            status=outcome.status,
            reason=masked(outcome.reason),
            at=outcome.at,
        ),
        last_refused=None
        if refusal is None
        else RefusalReport(
            digest=refusal.digest, reason=clipped(refusal.reason) or "", at=refusal.at
        ),
    )


def presence(station: str) -> Presence:
    """The station's presence topic for its backend's connection."""
    return Presence(
        topic=presence_topic(station),
        online=lambda: presence_payload(True, time.time()),
        offline=presence_payload(False),
    )


class StationReporter:
    """Publishes the presence and the state report through one backend's
    connection. Used by the drain loop, which hands it the acknowledgments
    of its publishes and renews the connection without the last will once
    reporting is off."""

    def __init__(self, config: Config, logger: Logger, agent: MessagingAgent) -> None:
        """Report for the station of `config`, reading the queue through the
        backend's own `agent` (no connection, no transaction of its own)."""
        self.agent = agent
        self.config = config
        self.logger = logger
        self.station = config.general.system_identifier
        self.enabled = True
        self.outstanding: set[int] = set()
        self.announced = False  # online said on the current connection
        self.checked_at = 0.0
        self.published_at = 0.0
        self.published_fingerprint: str | None = None
        self.strikes = 0
        self.retry_at = 0.0

    def tick(self, connection: MQTTConnection) -> None:
        """Say online after a connect; publish the report if it changed or is
        due (cheap when neither)."""
        if self.enabled and connection.presence is not None and connection.refusals >= _STRIKES:
            # a broker may refuse a connection whose last will its ACL denies
            # (or the credentials are wrong: then nothing is lost by this)
            self._give_up(f"the broker refused {connection.refusals} connections with it")
        if not self.enabled and time.monotonic() >= self.retry_at:
            self.enabled = True  # the broker's ACL may have changed: try again
            self.strikes = 0
        if not self.enabled or not connection.is_connected():
            return
        if not self.announced and connection.presence is not None:
            self._publish(connection, connection.presence.topic, connection.presence.online())
            self.announced = True
        now = time.monotonic()
        if now - self.checked_at < CHECK_SECONDS:
            return
        self.checked_at = now
        try:
            report = station_report(self.config, self.agent)
        except Exception as e:  # a report is never worth the backend
            self.logger.debug(f"no state report this time: {e}")
            return
        fingerprint = report.fingerprint()
        if fingerprint == self.published_fingerprint and now - self.published_at < REFRESH_SECONDS:
            return
        self._publish(connection, state_topic(self.station), report.model_dump_json().encode())
        self.published_fingerprint = fingerprint
        self.published_at = now

    def _publish(self, connection: MQTTConnection, topic: str, payload: bytes) -> None:
        self.outstanding.add(connection.publish(topic, payload, retain=True))

    def acknowledged(self, mid: int, refusal: str | None) -> bool:
        """Take the acknowledgment of publish `mid` if it was ours (True)."""
        if mid not in self.outstanding:
            return False
        self.outstanding.discard(mid)
        if refusal is not None:
            self._give_up(f"the broker refused it ({refusal})")
        else:
            self.strikes = 0
        return True

    def connection_lost(self) -> None:
        """The connection dropped: say online again after the reconnect (the
        broker may have sent the last will); if a publish of ours was
        outstanding, that may be why."""
        self.announced = False
        if self.outstanding:
            self.outstanding.clear()
            self.published_fingerprint = None  # sent again after the reconnect
            self.strikes += 1
            if self.strikes >= _STRIKES:
                self._give_up("the broker closed the connection while a report was outstanding")

    def new_connection(self) -> None:
        """A new client replaces the connection: its message ids start again,
        and presence and report go out again through it."""
        self.outstanding.clear()
        self.announced = False
        self.published_fingerprint = None

    def _give_up(self, why: str) -> None:
        if self.enabled:
            self.enabled = False
            self.retry_at = time.monotonic() + RETRY_SECONDS
            self.logger.warning(
                f"not publishing the station's state report for an hour: {why}; allow the "
                f"topics ivy/{self.station}/state and ivy/{self.station}/presence in the "
                "broker's ACL, or set report_state to false"
            )
