"""ThingsBoard: every message is telemetry on `v1/devices/me/telemetry`, as
arrays of `{"ts": ms, "values": {...}}`; the config is the shared attribute
`configuration`, pushed on `v1/devices/me/attributes` and requested at every
connect (answer on `v1/devices/me/attributes/response/+`), so a config changed
while the station was offline is picked up.

Each item's values carry `message_identifier`; logs use the keys `log_level`,
`log_subject`, `log_body`; config answers `config_status`, `config_revision`,
`config_software_version`, `config_reason` (an update adds `config_step`,
`config_step_seconds`, `sw_state`, `sw_error`, `target_sw_title`,
`target_sw_version`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from multiprocessing.synchronize import Event
from typing import Any

from src import constants
from src.types import Config
from src.types.backend import BackendInfo
from src.utils.messaging_agent import QueueRow
from src.utils.update.admission import parse_json_object

from .drain import destination_section, run_backend
from .provider import (
    Item,
    Provider,
    ReceivedConfig,
    data_json_of,
    encode,
    numbered_parts,
    split_mapping,
)

TELEMETRY_TOPIC = "v1/devices/me/telemetry"
ATTRIBUTES_TOPIC = "v1/devices/me/attributes"
ATTRIBUTE_REQUEST_TOPIC = "v1/devices/me/attributes/request/1"
ATTRIBUTE_RESPONSE_PREFIX = "v1/devices/me/attributes/response/"
CONFIG_ATTRIBUTE = "configuration"
_IDENTIFIER_KEY = "message_identifier"


# ThingsBoard closes the connection on an MQTT packet above 65,536 bytes (its
# default netty max_payload_size counts the topic and packet id too)
MAX_PACKET_BYTES = 65_536


class ThingsBoardProvider(Provider):
    """The ThingsBoard device MQTT API."""

    server_max_payload_bytes = MAX_PACKET_BYTES - 256  # topic, packet id, MQTT 5 properties

    def subscriptions(self) -> list[str]:
        """Pushed attribute updates and answers to attribute requests."""
        return [ATTRIBUTES_TOPIC, ATTRIBUTE_RESPONSE_PREFIX + "+"]

    def publishes_on_connect(self) -> list[tuple[str, bytes]]:
        """Ask for the current config at every connect."""
        return [(ATTRIBUTE_REQUEST_TOPIC, json.dumps({"sharedKeys": CONFIG_ATTRIBUTE}).encode())]

    def items_of(self, row: QueueRow, identifier: str) -> Iterable[Item]:
        """Telemetry at the measurement's time: one item per row, more when its
        values do not fit in one payload (see `_telemetry`)."""
        data = data_json_of(row, self.item_text_bytes)
        if data is not None and _IDENTIFIER_KEY not in data:
            # the common case, without parsing: every value a data message can
            # hold is one ThingsBoard takes
            item = (
                f'{{"ts":{int(row.timestamp * 1000)},"values":{data[:-1]},'
                f'"{_IDENTIFIER_KEY}":"{identifier}"}}}}'
            )
            return [(TELEMETRY_TOPIC, item.encode())]
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
            if body.get("step") is not None:
                values["config_step"] = body["step"]
                values["config_step_seconds"] = body.get("step_seconds")
            if body["status"] == "startup":  # the device's software, as ThingsBoard shows it
                values["current_sw_title"] = constants.NAME
                values["current_sw_version"] = body["software_version"]
            if body.get("software_update") is not None:  # ThingsBoard's OTA progress
                values["sw_state"] = body["software_update"]
                values["target_sw_title"] = constants.NAME
                values["target_sw_version"] = body["software_version"]
                if body["software_update"] == "FAILED":
                    values["sw_error"] = body["reason"]
        else:
            raise ValueError(f"unknown message variant {body['variant']!r}")
        return self._telemetry(row, identifier, values, self.item_text_bytes)

    def _telemetry(
        self, row: QueueRow, identifier: str, values: dict[str, Any], max_bytes: int
    ) -> list[Item]:
        """Items of at most `max_bytes`: values are spread over several items at
        the same time, and a string too long for one item is split into
        numbered parts, part i one millisecond after part 1 (ThingsBoard keeps
        one value per key and millisecond)."""
        ts = int(row.timestamp * 1000)
        part_bytes = max_bytes // 4
        first: dict[str, Any] = {}
        parts_of: dict[str, list[str]] = {}
        for key, value in values.items():
            if value is None:
                continue  # nothing to store; older ThingsBoard versions refuse null
            if isinstance(value, str) and len(encode(value)) - 2 > part_bytes:
                parts_of[key] = numbered_parts(value, 2**31, part_bytes)
                value = parts_of[key][0]
            first[key] = value
        chunks = [(ts, chunk) for chunk in split_mapping(first, max_bytes, len(row.body))]
        for i in range(1, max((len(p) for p in parts_of.values()), default=0)):
            chunks.append((ts + i, {k: p[i] for k, p in parts_of.items() if i < len(p)}))
        return [
            (TELEMETRY_TOPIC, {"ts": t, "values": {**chunk, _IDENTIFIER_KEY: identifier}})
            for t, chunk in chunks
        ]

    def error_items(
        self, row: QueueRow, identifier: str, text: str, max_part_bytes: int
    ) -> Iterable[Item]:
        """Telemetry `error` at the row's time, in parts if long."""
        return self._telemetry(row, identifier, {"error": text}, max_part_bytes * 4)

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
    section = destination_section(config, name)
    run_backend(config, name, teardown_indicator, ThingsBoardProvider(config, section))


info = BackendInfo(run=run)
