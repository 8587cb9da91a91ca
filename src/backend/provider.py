"""What a backend provider (Tenta, ThingsBoard) implements, and the packing of
queued rows into its batched payloads, which all providers share.

A provider turns one queued row into items, each bound for a topic whose
payload is a JSON array; `pack_rows` fills arrays up to the provider's payload
bound and remembers which rows each publish carries, so that a row is deleted
only when every publish that carries a part of it is acknowledged.

Every item a provider yields must be one its server accepts (DESIGN §11): the
tests run every published payload through a checker written from the servers'
own validation code.
"""

from __future__ import annotations

import abc
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import topic_matches_sub as mqtt_topic_matches

from src.types import BackendConfig, Config
from src.utils.messaging_agent import QueueRow

# json.dumps with non-default arguments builds an encoder per call: reuse one
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

# room left in an item's byte budget for its keys, timestamp and part marker
ITEM_ENVELOPE_BYTES = 512
# an isolated (poison) row goes out as an error in parts this small, so that
# even a broker with a tiny packet limit takes it
POISON_PART_BYTES = 768

# (topic, item): the item as a dict to encode, or as JSON bytes already encoded
# by a provider's fast path for the common case
Item = tuple[str, dict[str, Any] | bytes]

# how a queued data message's body starts (pydantic's compact JSON): what
# follows, up to the last brace, is the data object's own JSON text
DATA_BODY_PREFIX = '{"variant":"data","data":'


def data_json_of(row: QueueRow, max_bytes: int) -> str | None:
    """The JSON text of a data row's values, when it is short enough to need
    no splitting; None otherwise. Lets providers build the common item
    without parsing and re-encoding the body."""
    body = row.body
    if not body.startswith(DATA_BODY_PREFIX) or 4 * len(body) > max_bytes:
        return None
    return body[len(DATA_BODY_PREFIX) : -1]


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and Infinity raise (no server parses them)."""
    return _ENCODER.encode(value).encode()


@functools.lru_cache(maxsize=4_096)
def _encoded_char_bytes(character: str) -> int:
    return len(encode(character)) - 2  # without the quotes


def split_text(text: str, max_chars: int, max_bytes: int) -> list[str]:
    """`text` in consecutive parts of at most `max_chars` characters and
    `max_bytes` bytes once encoded as a JSON string, so that a long log is
    carried whole, never cut. Called by the providers."""
    if len(text) <= max_chars and len(encode(text)) - 2 <= max_bytes:
        return [text]
    parts: list[str] = []
    start = chars = size = 0
    for index, character in enumerate(text):
        cost = _encoded_char_bytes(character)
        if chars + 1 > max_chars or size + cost > max_bytes:
            parts.append(text[start:index])
            start, chars, size = index, 0, 0
        chars += 1
        size += cost
    parts.append(text[start:])
    return parts


def numbered_parts(text: str, max_chars: int, max_bytes: int) -> list[str]:
    """Like `split_text`, each part prefixed `[part i/n] ` when there are
    several, the prefix counted in the bounds."""
    reserve = 32  # "[part 12345/12345] "
    parts = split_text(text, max_chars - reserve, max_bytes - reserve)
    if len(parts) == 1:
        return parts
    return [f"[part {i}/{len(parts)}] {part}" for i, part in enumerate(parts, start=1)]


def split_mapping(
    values: Mapping[str, Any], max_bytes: int, source_chars: int | None = None
) -> list[dict[str, Any]]:
    """`values` in consecutive dicts whose encoding stays within `max_bytes`
    (a single entry larger than that stays alone). Called by the providers
    when one message has too many values for one item. `source_chars`, the
    length of the JSON text the values were read from, skips the measuring
    when even 4 bytes per character would fit (the drain loop's common case)."""
    if source_chars is not None and 4 * source_chars <= max_bytes:
        return [dict(values)]
    chunks: list[dict[str, Any]] = [{}]
    size = 2
    for key, value in values.items():
        entry = len(encode(key)) + len(encode(value)) + 2
        if chunks[-1] and size + entry > max_bytes:
            chunks.append({})
            size = 2
        chunks[-1][key] = value
        size += entry
    return chunks


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
    """A config found in a received MQTT message: the raw config object (a
    signed envelope, or a plain config where the trust policy allows it), or
    why it could not be read. `server_revision` is the revision the server
    gave it outside the config (Tenta's), which the answers carry."""

    config: Any
    error: str | None = None
    server_revision: int | None = None


class Provider(abc.ABC):
    """The protocol of one backend. Subclasses say which topics to subscribe
    to, what to publish at every connect, how a row becomes items, and where
    configs arrive; the connection and the drain loop are shared."""

    def __init__(self, config: Config, backend: BackendConfig | None = None) -> None:
        """Keep the config; `system_identifier` names the station's topics;
        `backend` is the destination's section (default: the `backend` one)."""
        backend = backend or config.backend
        assert backend is not None
        self.config = config
        self.identifier = config.general.system_identifier
        self.max_payload_bytes = min(backend.max_payload_bytes, self.server_max_payload_bytes)
        self.item_text_bytes = self.max_payload_bytes - ITEM_ENVELOPE_BYTES

    #: the largest payload the server takes; the config cannot raise it
    server_max_payload_bytes: int = 2**28
    #: whether the station's state report and presence go out beside the data
    #: (where the fleet's configs come from: Tenta's config topics)
    reports_state: bool = False

    @abc.abstractmethod
    def subscriptions(self) -> list[str]:
        """Topics to subscribe to (again) at every connect."""

    def publishes_on_connect(self) -> list[tuple[str, bytes]]:
        """Messages to publish at every connect, e.g. a request for the config."""
        return []

    @abc.abstractmethod
    def items_of(self, row: QueueRow, identifier: str) -> Iterable[Item]:
        """The (topic, item) pairs that carry one queued row."""

    @abc.abstractmethod
    def error_items(
        self, row: QueueRow, identifier: str, text: str, max_part_bytes: int
    ) -> Iterable[Item]:
        """Error log items carrying `text` in parts of at most `max_part_bytes`."""

    def unreadable_items(
        self, row: QueueRow, identifier: str, reason: str, max_part_bytes: int | None = None
    ) -> Iterable[Item]:
        """Items for a row that `items_of` cannot read (a message variant of a
        newer version, after a rollback) or that the broker refused: its raw
        body goes out as an error, so that the row neither blocks the queue nor
        is lost."""
        return self.error_items(
            row,
            identifier,
            f"unreadable queued message ({reason}): {row.body}",
            max_part_bytes or self.item_text_bytes,
        )

    def expects(self, topic: str) -> bool:
        """Whether messages on `topic` are for this provider (others are
        logged once and ignored)."""
        return any(mqtt_topic_matches(pattern, topic) for pattern in self.subscriptions())

    @abc.abstractmethod
    def config_in(self, topic: str, payload: bytes) -> ReceivedConfig | None:
        """The config in a received message, or None when the topic carries none."""


def pack_rows(
    provider: Provider,
    rows: Sequence[QueueRow],
    identifier_of: Callable[[int], str],
    solo_rows: Iterable[int] = (),
    poisoned_rows: Mapping[int, str] | None = None,
) -> list[Publish]:
    """Pack rows, oldest first, into publishes of at most the provider's
    payload bound (an item larger than that travels alone). Items keep their
    order per topic. Rows in `solo_rows` travel in publishes of their own;
    rows in `poisoned_rows` go out, alone, as an error holding their raw body
    and the reason. Called by the drain loop."""
    poisoned = poisoned_rows or {}
    solo = set(solo_rows) | set(poisoned)
    done: list[Publish] = []
    open_publishes: dict[str, Publish] = {}
    for row in rows:
        row_id = row.id
        identifier = identifier_of(row_id)
        if row_id in solo:
            # what came before goes first, so that the order per topic holds
            done.extend(open_publishes.values())
            open_publishes = {}
            done.extend(_pack_alone(provider, row, identifier, poisoned.get(row_id)))
            continue
        try:
            items = provider.items_of(row, identifier)
        except (ValueError, KeyError, TypeError) as e:
            items = provider.unreadable_items(row, identifier, f"{type(e).__name__}: {e}")
        _add_items(open_publishes, done, items, row_id, provider.max_payload_bytes)
    done.extend(open_publishes.values())
    return done


def _add_items(
    publishes: dict[str, Publish],
    done: list[Publish],
    items: Iterable[Item],
    row_id: int,
    max_payload_bytes: int,
) -> None:
    """Append one row's items to the open publish of each topic, closing a
    publish (into `done`) when the next item would not fit."""
    for topic, item in items:
        encoded = item if isinstance(item, bytes) else encode(item)
        size = len(encoded) + 1
        current = publishes.get(topic)
        if current is None or current.size + size > max_payload_bytes:
            if current is not None:
                done.append(current)
            current = publishes[topic] = Publish(topic)
        current.items.append(encoded)
        current.size += size
        if not current.row_ids or current.row_ids[-1] != row_id:
            current.row_ids.append(row_id)


def _pack_alone(
    provider: Provider, row: QueueRow, identifier: str, poison_reason: str | None
) -> list[Publish]:
    """The publishes of a row that travels alone; a poison row goes out as an
    error, each part in a publish of its own (its size may be what the broker
    refused)."""
    own: dict[str, Publish] = {}
    done: list[Publish] = []
    if poison_reason is not None:
        items = provider.unreadable_items(row, identifier, poison_reason, POISON_PART_BYTES)
        _add_items(own, done, items, row.id, 0)
    else:
        try:
            items = provider.items_of(row, identifier)
        except (ValueError, KeyError, TypeError) as e:
            items = provider.unreadable_items(row, identifier, f"{type(e).__name__}: {e}")
        _add_items(own, done, items, row.id, provider.max_payload_bytes)
    return done + list(own.values())
