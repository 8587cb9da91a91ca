"""Tenta: `measurements/<id>`, `logs/<id>`, `acknowledgments/<id>` as JSON arrays;
configs arrive retained on `configurations/<id>` as
`{"revision": n, "configuration": {...}}`.

Tenta stores only numbers as measurements. A data message's string values
travel as an `info` log on `logs/<id>` ("key: value; ..."), with the same
timestamp, revision and identifier, so nothing is lost. A rejection's reason,
which Tenta's acknowledgment cannot hold, follows as an `error` log; `received`
and `startup` config messages become `info` logs.
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

_SEVERITIES = {"DEBUG": "info", "INFO": "info", "WARNING": "warning", "ERROR": "error"}


class TentaProvider(Provider):
    """The Tenta protocol."""

    def subscriptions(self) -> list[str]:
        """The station's configuration topic."""
        return [f"configurations/{self.identifier}"]

    def items_of(self, row: QueueRow, identifier: str) -> Iterable[tuple[str, dict[str, Any]]]:
        """Measurements, logs and acknowledgments, each with the measurement
        time, the config revision and the message's identifier."""
        body = json.loads(row.body)
        common = {
            "timestamp": row.timestamp,
            "revision": row.config_revision,
            "identifier": identifier,
        }
        logs = f"logs/{self.identifier}"
        if body["variant"] == "data":
            numbers = {k: v for k, v in body["data"].items() if not isinstance(v, str)}
            texts = {k: v for k, v in body["data"].items() if isinstance(v, str)}
            if numbers:
                yield f"measurements/{self.identifier}", {"value": numbers, **common}
            if texts:
                message = "; ".join(f"{k}: {v}" for k, v in texts.items())
                yield logs, {"message": message, "severity": "info", **common}
        elif body["variant"] == "log":
            message = body["subject"] + (f"\n{body['body']}" if body["body"] else "")
            yield (
                logs,
                {"message": message, "severity": _SEVERITIES.get(body["level"], "error"), **common},
            )
        elif body["variant"] == "config":
            yield from self._config_items(body, common)
        else:
            raise ValueError(f"unknown message variant {body['variant']!r}")

    def unreadable_items(
        self, row: QueueRow, identifier: str, reason: str
    ) -> Iterable[tuple[str, dict[str, Any]]]:
        """An error log holding the raw body."""
        yield (
            f"logs/{self.identifier}",
            {
                "message": f"unreadable queued message ({reason}): {row.body[:4_000]}",
                "severity": "error",
                "timestamp": row.timestamp,
                "revision": row.config_revision,
                "identifier": identifier,
            },
        )

    def _config_items(
        self, body: dict[str, Any], common: dict[str, Any]
    ) -> Iterable[tuple[str, dict[str, Any]]]:
        logs = f"logs/{self.identifier}"
        revision = body["config_revision"]
        status = body["status"]
        if status in ("accepted", "rejected") and revision is not None:
            yield (
                f"acknowledgments/{self.identifier}",
                {
                    **common,
                    "revision": revision,
                    "success": status == "accepted",
                },
            )
        if status == "rejected":
            yield (
                logs,
                {
                    "message": f"config revision {revision} rejected: {body['reason']}",
                    "severity": "error",
                    **common,
                },
            )
        elif status in ("received", "startup"):
            text = (
                "received config revision"
                if status == "received"
                else "started with config revision"
            )
            yield logs, {"message": f"{text} {revision}", "severity": "info", **common}

    def config_in(self, topic: str, payload: bytes) -> ReceivedConfig | None:
        """`{"revision": n, "configuration": {...}}`; the envelope's revision is
        the config's revision."""
        if topic != f"configurations/{self.identifier}":
            return None
        envelope, error = parse_json_object(payload, "configuration message")
        if envelope is None:
            return ReceivedConfig(config=None, error=error)
        revision = envelope.get("revision")
        configuration = envelope.get("configuration")
        if not isinstance(revision, int) or isinstance(revision, bool):
            return ReceivedConfig(envelope, f"revision: expected an integer, got {revision!r}")
        if not isinstance(configuration, dict):
            return ReceivedConfig(envelope, "configuration: expected a JSON object")
        general = configuration.setdefault("general", {})
        if isinstance(general, dict):
            general["config_revision"] = revision
        return ReceivedConfig(configuration)


def run(config: Config, name: str, teardown_indicator: Event) -> None:
    """The Tenta backend process, started by the main loop."""
    run_backend(config, name, teardown_indicator, TentaProvider(config))
