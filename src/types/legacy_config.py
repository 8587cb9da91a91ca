"""Configs in Ivy 1.1's format (tum-esm/ivy), read as this version's: stations
and servers hold them today. Ivy 1.1 nests the broker's connection
(`backend.mqtt_connection.{host,port,client_id,username,password}`) and names
the release source `updater.provider` / `provider_host`; this version has
flat `backend.mqtt_*` fields and `updater.source` / `host`. Settings that have
no meaning here are named in the notice, never dropped in silence."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

_CONNECTION_FIELDS = {
    "host": "mqtt_host",
    "port": "mqtt_port",
    "client_id": "mqtt_client_id",
    "username": "mqtt_username",
    "password": "mqtt_password",
}
_DEFAULT_HOSTS = {"github": "github.com", "gitlab": "gitlab.com"}
_NO_CONFLICTS = "a version directory is reused only when it holds the verified release"
# Ivy 1.1 allows a longer drain than this version does
_MAX_DRAIN_SECONDS = 3_600


@dataclass(frozen=True)
class Translation:
    """A config read from Ivy 1.1's format: the config in this version's
    format and the one line that says what was translated and dropped."""

    config: dict[str, Any]
    notice: str


def is_ivy_1_1_config(raw: Any) -> bool:
    """Whether JSON data is a config in Ivy 1.1's format."""
    if not isinstance(raw, dict):
        return False
    backend, updater = raw.get("backend"), raw.get("updater")
    return (isinstance(backend, dict) and isinstance(backend.get("mqtt_connection"), dict)) or (
        isinstance(updater, dict) and "provider" in updater and "source" not in updater
    )


def translate_ivy_1_1(raw: dict[str, Any]) -> Translation:
    """`raw` (a config in Ivy 1.1's format) in this version's format, with the
    notice. Values are carried over as they are: this version's schema judges
    them and names any it refuses."""
    config = copy.deepcopy(raw)
    renamed: list[str] = []
    dropped: list[str] = []
    backend = config.get("backend")
    if isinstance(backend, dict) and isinstance(backend.get("mqtt_connection"), dict):
        connection = backend.pop("mqtt_connection")
        for old, new in _CONNECTION_FIELDS.items():
            if old in connection:
                backend[new] = connection.pop(old)
        renamed.append("backend.mqtt_connection.* -> backend.mqtt_*")
        dropped += [f"backend.mqtt_connection.{key}" for key in connection]
        drain = backend.get("max_drain_time")
        if isinstance(drain, int) and not isinstance(drain, bool) and drain > _MAX_DRAIN_SECONDS:
            backend["max_drain_time"] = _MAX_DRAIN_SECONDS
            renamed.append(
                f"backend.max_drain_time {drain} -> {_MAX_DRAIN_SECONDS} (the longest here)"
            )
    updater = config.get("updater")
    if isinstance(updater, dict) and "provider" in updater and "source" not in updater:
        provider = updater.pop("provider")
        updater["source"] = provider
        host = updater.pop("provider_host", None)
        if host is not None and host != _DEFAULT_HOSTS.get(str(provider)):
            updater["host"] = host
        renamed.append("updater.provider -> updater.source, updater.provider_host -> updater.host")
        for key in ("source_conflict_strategy", "source_conflict_behaviour"):
            if key in updater:
                updater.pop(key)
                dropped.append(f"updater.{key} ({_NO_CONFLICTS})")
    notice = "read as Ivy 1.1's config format (" + "; ".join(renamed) + ")"
    if dropped:
        notice += "; no meaning here, left out: " + ", ".join(dropped)
    return Translation(config, notice + "; `ivy config migrate` rewrites the file")
