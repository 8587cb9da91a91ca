"""ThingsBoard: every message is telemetry on `v1/devices/me/telemetry`, as
arrays of `{"ts": ms, "values": {...}}`; the config is the shared attribute
`configuration`, pushed on `v1/devices/me/attributes` and requested at every
connect (answer on `v1/devices/me/attributes/response/+`), so a config changed
while the station was offline is picked up.

Each item's values carry `message_identifier`; logs use the keys `log_level`,
`log_subject`, `log_body`; config answers `config_status`, `config_revision`,
`config_software_version`, `config_reason`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from multiprocessing.synchronize import Event
from typing import Any

from src.types import Config
from src.utils.messaging_agent import QueueRow

from .drain import parse_json_object, run_backend
from .provider import Provider, ReceivedConfig

TELEMETRY_TOPIC = "v1/devices/me/telemetry"
ATTRIBUTES_TOPIC = "v1/devices/me/attributes"
ATTRIBUTE_REQUEST_TOPIC = "v1/devices/me/attributes/request/1"
ATTRIBUTE_RESPONSE_PREFIX = "v1/devices/me/attributes/response/"
CONFIG_ATTRIBUTE = "configuration"


class ThingsBoardProvider(Provider):
    """The ThingsBoard device MQTT API."""

    def subscriptions(self) -> list[str]:
        """Pushed attribute updates and answers to attribute requests."""
        return [ATTRIBUTES_TOPIC, ATTRIBUTE_RESPONSE_PREFIX + "+"]

    def publishes_on_connect(self) -> list[tuple[str, bytes]]:
        """Ask for the current config at every connect."""
        return [(ATTRIBUTE_REQUEST_TOPIC, json.dumps({"sharedKeys": CONFIG_ATTRIBUTE}).encode())]

    def items_of(self, row: QueueRow, identifier: str) -> Iterable[tuple[str, dict[str, Any]]]:
        """One telemetry item per row, at the measurement's time."""
        body = json.loads(row.body)
        values: dict[str, Any]
        if body["variant"] == "data":
            values = dict(body["data"])
        elif body["variant"] == "log":
            values = {
                "log_level": body["level"],
                "log_subject": body["subject"],
                "log_body": body["body"],
            }
        elif body["variant"] == "config":
            values = {
                "config_status": body["status"],
                "config_revision": body["config_revision"],
                "config_software_version": body["software_version"],
                "config_reason": body["reason"],
            }
        else:
            raise ValueError(f"unknown message variant {body['variant']!r}")
        values["message_identifier"] = identifier
        yield TELEMETRY_TOPIC, {"ts": int(row.timestamp * 1000), "values": values}

    def unreadable_items(
        self, row: QueueRow, identifier: str, reason: str
    ) -> Iterable[tuple[str, dict[str, Any]]]:
        """Telemetry holding the raw body and why it could not be read."""
        yield (
            TELEMETRY_TOPIC,
            {
                "ts": int(row.timestamp * 1000),
                "values": {
                    "unreadable_message": row.body[:4_000],
                    "unreadable_reason": reason,
                    "message_identifier": identifier,
                },
            },
        )

    def config_in(self, topic: str, payload: bytes) -> ReceivedConfig | None:
        """The `configuration` shared attribute, pushed or requested; its value
        may be a JSON object or a string holding one."""
        if topic == ATTRIBUTES_TOPIC:
            attributes, error = parse_json_object(payload, "attribute update")
        elif topic.startswith(ATTRIBUTE_RESPONSE_PREFIX):
            response, error = parse_json_object(payload, "attribute response")
            shared = response.get("shared") if response is not None else None
            attributes = (
                shared if isinstance(shared, dict) else ({} if response is not None else None)
            )
        else:
            return None
        if attributes is None:
            return ReceivedConfig(config=None, error=error)
        if CONFIG_ATTRIBUTE not in attributes:
            return None  # another attribute changed
        value = attributes[CONFIG_ATTRIBUTE]
        if isinstance(value, str):
            value, error = parse_json_object(value.encode(), f"attribute {CONFIG_ATTRIBUTE}")
            if value is None:
                return ReceivedConfig(config=None, error=error)
        if not isinstance(value, dict):
            return ReceivedConfig(value, f"{CONFIG_ATTRIBUTE}: expected a JSON object")
        return ReceivedConfig(value)


def run(config: Config, name: str, teardown_indicator: Event) -> None:
    """The ThingsBoard backend process, started by the main loop."""
    run_backend(config, name, teardown_indicator, ThingsBoardProvider(config))
