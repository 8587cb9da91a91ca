"""What a backend provider (Tenta, ThingsBoard) implements, and the packing of
queued rows into its batched payloads, which all providers share.

A provider turns one queued row into items, each bound for a topic whose
payload is a JSON array; `pack_rows` fills arrays up to `max_payload_bytes`
and remembers which rows each publish carries, so that a row is deleted only
when every publish that carries a part of it is acknowledged.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from src.types import Config
from src.utils.messaging_agent import QueueRow

# json.dumps with non-default arguments builds an encoder per call: reuse one
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


@dataclass
class Publish:
    """One MQTT publish: a JSON array of items and the rows they came from."""

    topic: str
    items: list[bytes] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)
    size: int = 2  # the brackets

    def payload(self) -> bytes:
        """The JSON array."""
        return b"[" + b",".join(self.items) + b"]"


@dataclass(frozen=True)
class ReceivedConfig:
    """A config found in a received MQTT message: the raw config object (to be
    validated as a `ForeignConfig`), or why it could not be read."""

    config: Any
    error: str | None = None


class Provider(abc.ABC):
    """The protocol of one backend. Subclasses say which topics to subscribe
    to, what to publish at every connect, how a row becomes items, and where
    configs arrive; the connection and the drain loop are shared."""

    def __init__(self, config: Config) -> None:
        """Keep the config; `system_identifier` names the station's topics."""
        self.config = config
        self.identifier = config.general.system_identifier

    @abc.abstractmethod
    def subscriptions(self) -> list[str]:
        """Topics to subscribe to (again) at every connect."""

    def publishes_on_connect(self) -> list[tuple[str, bytes]]:
        """Messages to publish at every connect, e.g. a request for the config."""
        return []

    @abc.abstractmethod
    def items_of(self, row: QueueRow, identifier: str) -> Iterable[tuple[str, dict[str, Any]]]:
        """The (topic, item) pairs that carry one queued row."""

    @abc.abstractmethod
    def unreadable_items(
        self, row: QueueRow, identifier: str, reason: str
    ) -> Iterable[tuple[str, dict[str, Any]]]:
        """Items for a row that `items_of` cannot read (e.g. a message variant
        of a newer version, after a rollback): the raw body goes out as an
        error, so that the row neither blocks the queue nor is lost."""

    @abc.abstractmethod
    def config_in(self, topic: str, payload: bytes) -> ReceivedConfig | None:
        """The config in a received message, or None when the topic carries none."""


def pack_rows(
    provider: Provider,
    rows: Sequence[QueueRow],
    identifier_of: Callable[[int], str],
    max_payload_bytes: int,
) -> list[Publish]:
    """Pack rows, oldest first, into publishes of at most `max_payload_bytes`
    (an item larger than that travels alone). Items keep their order per topic.
    Called by the drain loop."""
    done: list[Publish] = []
    open_publishes: dict[str, Publish] = {}
    for row in rows:
        identifier = identifier_of(row.id)
        try:
            items = list(provider.items_of(row, identifier))
        except (ValueError, KeyError, TypeError) as e:
            items = list(provider.unreadable_items(row, identifier, f"{type(e).__name__}: {e}"))
        for topic, item in items:
            encoded = _ENCODER.encode(item).encode()
            current = open_publishes.get(topic)
            if current is not None and current.size + len(encoded) + 1 > max_payload_bytes:
                done.append(current)
                current = None
            if current is None:
                current = open_publishes[topic] = Publish(topic)
            current.items.append(encoded)
            current.size += len(encoded) + 1
            if not current.row_ids or current.row_ids[-1] != row.id:
                current.row_ids.append(row.id)
    done.extend(open_publishes.values())
    return done
