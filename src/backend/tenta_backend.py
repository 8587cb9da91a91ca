"""Tenta: `measurements/<id>`, `logs/<id>`, `acknowledgments/<id>` as JSON arrays;
configs arrive retained on `configurations/<id>` as
`{"revision": n, "configuration": {...}}`. `<id>` is the sensor's UUID.

Tenta validates every array strictly (DESIGN §11, from its
`server/app/validation/`): items have exactly the keys below and no other,
one bad item drops the whole array after the broker's PUBACK, and nothing
tells the station. So every item here is built to pass those rules:

- measurements `{value, timestamp, revision?}`: `value` maps keys matching
  `^[a-z0-9](_?[a-z0-9])*$` (at most 64 characters) to numbers (not booleans);
- logs `{message, severity, timestamp, revision?}`: severity info, warning or
  error; a message longer than 16,384 characters is split into numbered parts;
- acknowledgments `{success, timestamp, revision}`;
- `timestamp` and `revision` within `0 <= x < 2**31`.

A data value Tenta cannot store as a measurement does not sink the rest: the
valid values go out as a measurement, string values as an `info` log
("key: value; ..."), and values with a bad key, booleans or non-finite numbers
as an `error` log naming key and value. Tenta has no field for a message
identifier and does not deduplicate (see the README).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from multiprocessing.synchronize import Event
from typing import Any

from src.types import Config
from src.types.backend import BackendInfo
from src.types.config import is_valid_revision
from src.utils.messaging_agent import QueueRow
from src.utils.update.admission import parse_json_object

from .drain import destination_section, run_backend
from .provider import (
    Item,
    Provider,
    ReceivedConfig,
    data_json_of,
    numbered_parts,
    split_mapping,
)

KEY_PATTERN = re.compile(r"^[a-z0-9](_?[a-z0-9])*$")
MAX_KEY_LENGTH = 64
MAX_MESSAGE_CHARS = 16_384
INT4_LIMIT = 2**31  # timestamps (and revisions: is_valid_revision) are PostgreSQL int4-sized
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_KEY = r'"(?=[a-z0-9_]{1,64}")[a-z0-9](?:_?[a-z0-9])*"'
# a data object of valid keys and plain numbers only: sent as it is stored
_PLAIN_MEASUREMENT = re.compile(rf"\{{{_KEY}:{_NUMBER}(?:,{_KEY}:{_NUMBER})*\}}")
_SEVERITIES = {"DEBUG": "info", "INFO": "info", "WARNING": "warning", "ERROR": "error"}


@functools.lru_cache(maxsize=64)
def _revision_suffix(revision: int) -> str:
    return f',"revision":{revision}' if is_valid_revision(revision) else ""


@functools.lru_cache(maxsize=4_096)
def key_problem(key: str) -> str | None:
    """Why Tenta would refuse `key` in a measurement, or None (keys repeat:
    cached)."""
    if len(key) > MAX_KEY_LENGTH or not KEY_PATTERN.match(key):
        return f"key must match {KEY_PATTERN.pattern} with at most {MAX_KEY_LENGTH} characters"
    return None


def measurement_problem(key: str, value: Any) -> str | None:
    """Why Tenta would refuse `key: value` in a measurement, or None."""
    problem = key_problem(key)
    if problem is not None:
        return problem
    if type(value) is float:
        return None if math.isfinite(value) else "not a finite number"
    if type(value) is not int:
        return f"{type(value).__name__} is not a number"
    return None


class TentaProvider(Provider):
    """The Tenta protocol."""

    reports_state = True

    def subscriptions(self) -> list[str]:
        """The station's configuration topic."""
        return [f"configurations/{self.identifier}"]

    def _common(self, row: QueueRow, clamp: bool = False) -> dict[str, Any]:
        timestamp = row.timestamp
        if not 0 <= timestamp < INT4_LIMIT:
            if not clamp:
                raise ValueError(f"timestamp {timestamp} is outside Tenta's range")
            timestamp = (
                min(max(timestamp, 0.0), INT4_LIMIT - 1.0) if not math.isnan(timestamp) else 0.0
            )
        common: dict[str, Any] = {"timestamp": timestamp}
        if is_valid_revision(row.config_revision):
            common["revision"] = row.config_revision
        return common

    def _logs(self, text: str, severity: str, common: dict[str, Any], max_bytes: int) -> list[Item]:
        topic = f"logs/{self.identifier}"
        return [
            (topic, {"message": part, "severity": severity, **common})
            for part in numbered_parts(text, MAX_MESSAGE_CHARS, max_bytes)
        ]

    def items_of(self, row: QueueRow, identifier: str) -> Iterable[Item]:
        """Measurements, logs and acknowledgments, each with the measurement
        time and the config revision it was measured under."""
        fast = self._plain_measurement(row)
        if fast is not None:
            return [(f"measurements/{self.identifier}", fast)]
        body = json.loads(row.body)
        common = self._common(row)
        variant = body["variant"]
        if variant == "data":
            return self._data_items(body["data"], common, len(row.body))
        if variant == "log":
            text = body["subject"] + (f"\n{body['body']}" if body["body"] else "")
            severity = _SEVERITIES.get(body["level"], "error")
            return self._logs(text, severity, common, self.item_text_bytes)
        if variant == "config":
            return self._config_items(body, common)
        raise ValueError(f"unknown message variant {variant!r}")

    def _plain_measurement(self, row: QueueRow) -> bytes | None:
        """The measurement item of a data row whose keys are all valid and
        whose values are all numbers, built from the stored JSON text without
        parsing it (most rows: this is the drain loop's hot path)."""
        data = data_json_of(row, self.item_text_bytes)
        timestamp = row.timestamp
        if (
            data is None
            or not 0 <= timestamp < INT4_LIMIT
            or not _PLAIN_MEASUREMENT.fullmatch(data)
        ):
            return None
        revision = _revision_suffix(row.config_revision)
        return f'{{"value":{data},"timestamp":{timestamp!r}{revision}}}'.encode()

    def _data_items(self, data: dict[str, Any], common: dict[str, Any], size: int) -> list[Item]:
        numbers: dict[str, Any] = {}
        texts: list[str] = []
        refused: list[str] = []
        for key, value in data.items():
            problem = measurement_problem(key, value)
            if problem is None:
                numbers[key] = value
            elif isinstance(value, str) and key_problem(key) is None:
                texts.append(f"{key}: {value}")
            else:
                refused.append(f"{key!r} = {json.dumps(value)} ({problem})")
        items: list[Item] = [
            (f"measurements/{self.identifier}", {"value": chunk, **common})
            for chunk in (split_mapping(numbers, self.item_text_bytes, size) if numbers else [])
        ]
        if texts:
            items += self._logs("; ".join(texts), "info", common, self.item_text_bytes)
        if refused:
            text = "values Tenta does not accept as measurements: " + "; ".join(refused)
            items += self._logs(text, "error", common, self.item_text_bytes)
        return items

    def _config_items(self, body: dict[str, Any], common: dict[str, Any]) -> list[Item]:
        revision = body["config_revision"]
        status = body["status"]
        items: list[Item] = []
        if status in ("accepted", "rejected") and is_valid_revision(revision):
            items.append(
                (
                    f"acknowledgments/{self.identifier}",
                    {
                        "success": status == "accepted",
                        "timestamp": common["timestamp"],
                        "revision": revision,
                    },
                )
            )
        if status == "rejected":
            text = f"config revision {revision} rejected: {body['reason']}"
            items += self._logs(text, "error", common, self.item_text_bytes)
        else:
            text = {
                "received": f"received config revision {revision}",
                "accepted": f"accepted config revision {revision}",
                "startup": f"started with config revision {revision}",
                "progress": f"config revision {revision}: {body.get('step')} done "
                f"in {body.get('step_seconds')} s",
            }.get(status, f"config revision {revision}: {status}")  # another version's status
            text += f" (Ivy {body['software_version']})"
            items += self._logs(text, "info", common, self.item_text_bytes)
        return items

    def error_items(
        self, row: QueueRow, identifier: str, text: str, max_part_bytes: int
    ) -> Iterable[Item]:
        """Error logs at the row's time (clamped into Tenta's range)."""
        return self._logs(text, "error", self._common(row, clamp=True), max_part_bytes)

    def config_in(self, topic: str, payload: bytes) -> ReceivedConfig | None:
        """`{"revision": n, "configuration": {...}}`; Tenta's revision becomes
        the config's revision once the configuration is verified."""
        if topic != f"configurations/{self.identifier}":
            return None
        envelope, error = parse_json_object(payload, "configuration message")
        if envelope is None:
            return ReceivedConfig(config=None, error=error)
        revision = envelope.get("revision")
        configuration = envelope.get("configuration")
        if not is_valid_revision(revision):
            # refused before verification: an unsigned revision that breaks the
            # config must not mark the signed change in it as handled
            return ReceivedConfig(
                envelope, f"revision: expected an integer 0 <= r < 2**31, got {revision!r}"
            )
        if not isinstance(configuration, dict):
            return ReceivedConfig(envelope, "configuration: expected a JSON object")
        return ReceivedConfig(configuration, server_revision=revision)


def run(config: Config, name: str, teardown_indicator: Event) -> None:
    """The Tenta backend process, started by the main loop."""
    section = destination_section(config, name)
    run_backend(config, name, teardown_indicator, TentaProvider(config, section))


info = BackendInfo(run=run)
