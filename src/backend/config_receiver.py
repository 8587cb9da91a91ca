"""Configs arriving over MQTT, judged in the backend process before anything
else sees them. Whatever arrives is hostile: its size and nesting are bounded
before it is parsed, its revision and version are checked strictly, and every
config that is not valid is answered `rejected` with a reason naming the field
and the value, so that the operator at the server can tell a refusal from a
loss. Valid configs with a new revision are queued for the main loop's
updater; configs whose revision was handled already are ignored (logged once).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pydantic

from src.types import Config, ConfigMessageBody, ForeignConfig
from src.types.config import format_validation_error, revision_of
from src.utils.logger import Logger
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.updater import (
    MAX_CONFIG_BYTES,
    config_revision_is_new,
    mark_config_revision_rejected,
    queue_pending_config,
)

from .provider import ReceivedConfig

MAX_CONFIG_NESTING = 32
_ANSWERED_KEPT = 256
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting_exceeds(payload: bytes, limit: int) -> bool:
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', payload)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def parse_json_object(payload: bytes, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from a received payload, or a clear error naming `what`.
    Payloads larger than `MAX_CONFIG_BYTES` or nested deeper than
    `MAX_CONFIG_NESTING` are refused unparsed. Called by the providers."""
    if len(payload) > MAX_CONFIG_BYTES:
        return None, (
            f"{what}: {len(payload)} bytes, more than the {MAX_CONFIG_BYTES} accepted; not parsed"
        )
    if _nesting_exceeds(payload, MAX_CONFIG_NESTING):
        return None, f"{what}: nested deeper than {MAX_CONFIG_NESTING} levels; not parsed"
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, f"{what}: not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"{what}: expected a JSON object, got {_json_type(value)}"
    return value, None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


class ConfigReceiver:
    """Judge configs on arrival: reject, ignore, or queue them for the updater.
    Used by the backend process only."""

    def __init__(self, config: Config, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Remember the running revision."""
        self.current_revision = config.general.config_revision
        self.logger = logger
        self.messaging_agent = messaging_agent
        self.answered: list[str] = []  # digests of configs answered by this process
        self.ignored: set[int] = set()  # revisions whose ignoring was logged

    def handle(self, received: ReceivedConfig, payload: bytes) -> None:
        """Reject, ignore or queue one received config (`payload`: the MQTT
        message it came in)."""
        raw = received.config
        if received.error is not None:
            self._reject(raw, received.error, payload)
            return
        try:
            foreign = ForeignConfig.model_validate(raw)
        except pydantic.ValidationError as e:
            self._reject(raw, format_validation_error(e, "received config"), payload)
            return
        revision = foreign.general.config_revision
        if not self._is_new(revision):
            return
        if not queue_pending_config(foreign):
            return
        self.logger.info(f"received config revision {revision}; queued for the updater")

    def _is_new(self, revision: int) -> bool:
        if config_revision_is_new(revision, self.current_revision, StateInterface.load()):
            return True
        if revision not in self.ignored:
            if len(self.ignored) >= _ANSWERED_KEPT:  # a flood of old revisions: stay bounded
                self.ignored.clear()
            self.ignored.add(revision)
            self.logger.info(f"ignoring config revision {revision}: handled already")
        return False

    def _reject(self, raw: Any, reason: str, payload: bytes) -> None:
        revision = revision_of(raw)
        if revision is not None and not self._is_new(revision):
            return  # an old, broken config that is still retained somewhere
        digest = hashlib.sha256(payload).hexdigest()
        if digest in self.answered:
            return  # the same message again (a retained one after a reconnect)
        self.answered = [*self.answered[-(_ANSWERED_KEPT - 1) :], digest]
        if revision is None:
            reason = f"no valid revision could be read, so this answer carries none; {reason}"
        else:
            mark_config_revision_rejected(revision)
        self.logger.warning(f"rejected a received config (revision {revision})", details=reason)
        self.messaging_agent.add_message(ConfigMessageBody.about("rejected", raw, reason))
