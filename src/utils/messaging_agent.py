"""The durable message queue (SQLite, WAL) and the daily message archive.

The queue doubles as the archive's outbox: rows get ever-growing ids
(AUTOINCREMENT, never reused), and the counter `archived_up_to` marks how far
they have been appended to `messages/YYYY-MM-DD.jsonl`. So `add_message` is one
INSERT and one fsync (the commit) and is durable in the queue and for the
archive at once; `flush_archive` (the main loop, every few seconds) appends the
rows above the mark in batches with one fsync per batch. No row is deleted
before it is archived: `remove_messages` and the size cap flush first.
`load_message_archive` reads the file plus the rows not yet flushed.

A message's identifier is `<prefix>-<row id>`: the prefix is random, made once
per queue database, so identifiers are unique across stations and stable
across redeliveries without being stored.

Every process opens its own `MessagingAgent`; SQLite's locking serializes them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

import pydantic

from src import constants
from src.types import (
    Config,
    ConfigError,
    MessageArchiveItem,
    MessageBody,
    MessageQueueItem,
    StorageConfig,
)

from . import queue_destinations
from .functions import utc_date_string
from .queue_destinations import Destination, counter
from .sqlite_transaction import immediate_transaction

# the reference API's module-level paths (the agent reads src.constants at
# call time, so that tests and tools can point it elsewhere)
ACTIVE_QUEUE_FILE: str = constants.MESSAGE_QUEUE_PATH
MESSAGE_ARCHIVE_DIR: str = constants.MESSAGE_ARCHIVE_DIR
MESSAGE_ARCHIVE_DIR_LOCK: str = os.path.join(constants.DATA_DIR, "messages.lock")

# The queue database's schema version (`PRAGMA user_version`). Version 1 is the
# schema below; databases from before versioning (0) have the same tables.
# A newer Ivy migrates forward in one transaction at open (`_MIGRATIONS`). Its
# migrations may only add (tables, columns with a default, indexes), never
# remove or rename, so that after going back to an older version that version
# still writes and reads the queue: it names every column it uses, ignores
# the rest, and leaves a newer user_version as it is. A row an older
# provider cannot make sense of goes out as an error log holding its raw body
# (the drain's poison-row path), so it never blocks the queue.
QUEUE_SCHEMA_VERSION = 2

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        timestamp REAL NOT NULL,
        variant TEXT NOT NULL,
        config_revision INTEGER NOT NULL,
        body TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
    # queue depth = rows ever inserted (sqlite_sequence, kept by AUTOINCREMENT,
    # gap-free) - rows removed: so adding a message writes no counter page
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('removed', 0)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('poisoned', 0)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('archived_up_to', 0)",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('identifier_prefix', ?)",
]

# version 2: destinations, each with a bit in `pending` (queue_destinations);
# rows from before it are pending for every destination; a partial index finds
# the logs and config answers that go before the data backlog
_DESTINATIONS_SCHEMA = [
    "ALTER TABLE queue ADD COLUMN pending INTEGER NOT NULL DEFAULT -1",
    """CREATE TABLE IF NOT EXISTS destinations (
        name TEXT PRIMARY KEY,
        bit INTEGER NOT NULL UNIQUE,
        variants TEXT NOT NULL,
        max_queued INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS queue_priority ON queue (id) WHERE variant != 'data'",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('destinations_version', 0)",
]

# schema version -> the statements that migrate the version before it to it
_MIGRATIONS: dict[int, list[str]] = {1: _SCHEMA, 2: _DESTINATIONS_SCHEMA}

# the order in which the size cap drops messages: data first, config answers last

_DROP_ORDER = ("data", "log", "config")
_SQLITE_MAX_PARAMETERS = 900
_ARCHIVE_FLUSH_BATCH = 5_000
_ROW_COLUMNS = "id, timestamp, variant, config_revision, body"
# a destination's streams: logs and config answers go before the data backlog
# (with newest-first catch-up, the data measured since the catch-up began,
# "live", go before the data backlog)
Stream = Literal["priority", "data", "live"]
_STREAM_FILTER: dict[Stream | None, str] = {
    None: "",
    "priority": "AND variant != 'data'",
    "data": "AND variant = 'data'",
    "live": "AND variant = 'data'",
}
_STREAM_MARK: dict[Stream, str] = {
    "priority": "sent_priority_up_to",
    "data": "sent_up_to",
    "live": "live_sent_up_to",
}


class QueueRow(NamedTuple):
    """A queued message as stored: the body stays JSON text, so that a backend
    can forward it without a round trip through pydantic."""

    id: int
    timestamp: float
    variant: str
    config_revision: int
    body: str


class TakenRows(NamedTuple):
    """Rows taken to send, and the id up to which the queue was looked at: a
    cursor may move past it, as no row up to it is left for this stream."""

    rows: list[QueueRow]
    looked_up_to: int


def _checked_timestamp(timestamp: float) -> float:
    """A procedure's own timestamp as SQLite and every backend can hold it, or
    a clear ValueError for the procedure (never an OverflowError)."""
    try:
        value = float(timestamp)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"timestamp {timestamp!r} is not a number of seconds") from None
    if not 0 <= value < 2**33:  # 1970 to the year 2242
        raise ValueError(f"timestamp {timestamp!r} is not a unix time in seconds")
    return value


class QueueUnreadableError(Exception):
    """The queue database exists but SQLite cannot use it (corrupt, not a
    database); the message names the file."""


def _running_config() -> Config | None:
    try:
        return Config.load()
    except ConfigError:
        return None


class _UtcDay:
    """The UTC date of timestamps that mostly fall on the same day, without a
    strftime per row."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.name = ""

    def of(self, timestamp: float) -> str:
        if not self.start <= timestamp < self.end:
            day = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).date()
            start = datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc)
            self.start = start.timestamp()
            self.end = self.start + 86_400
            self.name = day.isoformat()
        return self.name


class MessagingAgent:
    """One process's handle on the queue and the archive."""

    def __init__(
        self,
        config: Config | None = None,
        queue_path: str | None = None,
        archive_dir: str | None = None,
    ) -> None:
        """Open (and create) the queue. Messages are stamped with the config's
        revision; without a config, the running `config/config.json`'s (or
        none, 0, when it cannot be read). Called by every process that
        produces or sends messages, once at its start."""
        if config is None:
            config = _running_config()
        storage = config.storage if config is not None else StorageConfig()
        self.config_revision = config.general.config_revision if config is not None else 0
        self.max_queued_messages = storage.max_queued_messages
        queue_path = queue_path or constants.MESSAGE_QUEUE_PATH
        self.archive_dir = archive_dir or constants.MESSAGE_ARCHIVE_DIR
        os.makedirs(os.path.dirname(os.path.abspath(queue_path)), exist_ok=True)
        os.makedirs(self.archive_dir, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below)
        self.connection = sqlite3.connect(queue_path, timeout=60, isolation_level=None)
        try:
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute(f"PRAGMA synchronous={storage.sqlite_synchronous}")
            self.connection.execute("PRAGMA busy_timeout=60000")
            with self._transaction():
                self._migrate()
        except sqlite3.DatabaseError as e:
            self.connection.close()
            raise QueueUnreadableError(
                f"the message queue {queue_path} cannot be opened ({e}); it is left as it is "
                "for inspection: move it aside to start a new queue"
            ) from None
        self.identifier_prefix = f"{self._read_counter('identifier_prefix'):016x}"
        self._sent_up_to_seen: dict[str, int] = {}  # marks as far as this process moved them
        self._destinations_version = -1
        self.destinations: dict[str, Destination] = {}
        self._routing: dict[str, int] = {}
        self._live_mask = 0
        self._refresh_destinations()

    def _migrate(self) -> None:
        """Bring the schema up to `QUEUE_SCHEMA_VERSION`, inside the caller's
        transaction (all steps or none); a newer database is left alone."""
        found = int(self.connection.execute("PRAGMA user_version").fetchone()[0])
        columns = {row[1] for row in self.connection.execute("PRAGMA table_info(queue)")}
        for version in range(found + 1, QUEUE_SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                if statement.startswith("ALTER TABLE queue ADD COLUMN pending") and (
                    "pending" in columns
                ):
                    continue  # each step may meet a database that has it already
                parameters = (secrets.randbits(62),) if "?" in statement else ()
                self.connection.execute(statement, parameters)
        if found < QUEUE_SCHEMA_VERSION:
            self.connection.execute(f"PRAGMA user_version = {QUEUE_SCHEMA_VERSION}")

    def get_schema_version(self) -> int:
        """The queue database's schema version (newer when a newer Ivy wrote it)."""
        return int(self.connection.execute("PRAGMA user_version").fetchone()[0])

    def teardown(self) -> None:
        """Close the connection to the queue (the reference API's name)."""
        self.close()

    @staticmethod
    def get_message_archive_file() -> str:
        """Today's archive file (UTC date), `messages/YYYY-MM-DD.jsonl`."""
        return os.path.join(constants.MESSAGE_ARCHIVE_DIR, f"{utc_date_string(time.time())}.jsonl")

    def close(self) -> None:
        """Close the connection; the agent cannot be used afterwards."""
        self.connection.close()

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """All of it or nothing: a failed add leaves no row behind."""
        return immediate_transaction(self.connection)

    def identifier_of(self, row_id: int) -> str:
        """The stable identifier of the message in row `row_id`."""
        return f"{self.identifier_prefix}-{row_id}"

    # --- destinations ------------------------------------------------------------

    def _refresh_destinations(self) -> None:
        """Reload the destinations when another process changed them (a cheap
        counter read; called inside each transaction that routes or releases)."""
        version = self._read_counter("destinations_version")
        if version != self._destinations_version:
            self.destinations = queue_destinations.load(self.connection)
            self._routing = queue_destinations.routing(self.destinations)
            self._live_mask = queue_destinations.live_mask(self.destinations.values())
            self._destinations_version = version

    def sync_destinations(
        self, wanted: Mapping[str, tuple[frozenset[str], int]], release_others: bool = True
    ) -> dict[str, int]:
        """Make the registered destinations `wanted` (name -> the variants it
        gets and its size cap): new ones are added, changed ones updated, and
        the others released, so that rows are no longer kept for them (unless
        not `release_others`: a change on trial that may yet be rolled back).
        Returns each released destination's name -> the rows it had not got.
        Called by the main loop at its start and after a config change."""
        released: dict[str, int] = {}
        with self._transaction():
            self._refresh_destinations()
            takes_waiting_rows = not self.destinations
            for name, destination in self.destinations.items():
                if name not in wanted and release_others:
                    released[name] = queue_destinations.unregister(self.connection, destination)
            registered = {
                n: d for n, d in self.destinations.items() if n in wanted or not release_others
            }
            for name, (variants, max_queued) in wanted.items():
                registered[name] = queue_destinations.register(
                    self.connection, name, variants, max_queued, registered, takes_waiting_rows
                )
            self._add_to_counter("destinations_version", 1)
            self._refresh_destinations()
            for destination in self.destinations.values():
                queue_destinations.recount(self.connection, destination)
            if self._live_mask:
                # rows that were kept only for a released destination
                self._flush_archive_in_transaction()
                deleted = self.connection.execute(
                    "DELETE FROM queue WHERE (pending & ?) = 0", (self._live_mask,)
                ).rowcount
                self._add_to_counter("removed", deleted)
        return released

    def ensure_destination(self, name: str, variants: frozenset[str], max_queued: int) -> None:
        """Register one destination if it is not (a backend run on its own,
        without a main loop), leaving the others as they are."""
        with self._transaction():
            self._refresh_destinations()
            if name in self.destinations:
                return
            queue_destinations.register(
                self.connection,
                name,
                variants,
                max_queued,
                self.destinations,
                not self.destinations,
            )
            self._add_to_counter("destinations_version", 1)
            self._refresh_destinations()

    def _destination(self, name: str) -> Destination:
        destination = self.destinations.get(name)
        if destination is None:
            raise KeyError(f"{name} is not a registered destination of the queue")
        return destination

    # --- producing -------------------------------------------------------------

    def add_message(self, message_body: MessageBody, timestamp: float | None = None) -> str:
        """Queue and archive one message; return its identifier once it is
        durable on disk. Called by procedures, the logger and the updater."""
        return self.add_messages([message_body], timestamp)[0]

    def add_messages(
        self,
        bodies: Sequence[MessageBody],
        timestamp: float | None = None,
        *,
        only_to: str | None = None,
    ) -> list[str]:
        """Queue and archive many messages in one transaction (one fsync); return
        their identifiers in order. Each goes to every destination that takes
        its variant (`only_to`: to that destination alone). Called by
        procedures that measure in bursts."""
        if not bodies:
            return []
        now = time.time() if timestamp is None else _checked_timestamp(timestamp)
        revision = self.config_revision
        with self._transaction():
            self._refresh_destinations()
            routing = self._routing
            if only_to is not None:
                routing = dict.fromkeys(routing, self._destination(only_to).mask)
            # what model_dump_json() calls, without its per-call argument
            # handling: this is the hot path of every procedure
            rows = [
                (
                    now,
                    body.variant,
                    revision,
                    body.__pydantic_serializer__.to_json(body).decode(),
                    routing[body.variant],
                )
                for body in bodies
            ]
            self.connection.executemany(
                "INSERT INTO queue (timestamp, variant, config_revision, body, pending) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            # AUTOINCREMENT under BEGIN IMMEDIATE: this transaction's ids are
            # contiguous and end at last_insert_rowid(), which is also the
            # number of rows ever inserted
            last_id, removed = self.connection.execute(
                "SELECT last_insert_rowid(), value FROM counters WHERE name = 'removed'"
            ).fetchone()
            if self.destinations:
                self._route(rows)
            elif last_id - removed > self.max_queued_messages:
                self._drop_oldest_unsent(last_id - removed)
        prefix = self.identifier_prefix
        return [f"{prefix}-{i}" for i in range(last_id - len(rows) + 1, last_id + 1)]

    def _route(self, rows: Sequence[tuple[float, str, int, str, int]]) -> None:
        """Count new rows for each destination they go to, and keep each under
        its own cap."""
        for destination in self.destinations.values():
            count = sum(1 for row in rows if row[4] & destination.mask)
            if not count:
                continue
            routed = self._add_to_counter(counter("routed", destination.name), count)
            pending = routed - self._read_counter(counter("released", destination.name))
            if pending > destination.max_queued:
                self._drop_for(destination, pending)

    def _add_to_counter(self, name: str, delta: int) -> int:
        # an upsert: counters added after schema version 1 need no migration
        row = self.connection.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value RETURNING value",
            (name, delta),
        ).fetchone()
        return int(row[0])

    def _set_counter(self, name: str, value: int) -> None:
        self.connection.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _drop_oldest_unsent(self, queued: int) -> None:
        """A station without a destination: bring the queue back under the
        cap, oldest first (data, then logs, then config answers), never a row
        up to the `sent_up_to` mark (a backend run on its own may have sent
        it). So the dropped count is exactly what no broker got."""
        sent_up_to = self._read_counter("sent_up_to")
        (sent_still_queued,) = self.connection.execute(
            "SELECT count(*) FROM queue WHERE id <= ?", (sent_up_to,)
        ).fetchone()
        excess = queued - int(sent_still_queued) - self.max_queued_messages
        if excess <= 0:
            return
        self._flush_archive_in_transaction()  # dropped from the queue, not from the archive
        # drop a little more than needed so that a full queue does not pay for
        # this on every single add
        remaining = excess + max(1, self.max_queued_messages // 100)
        dropped = 0
        for variant in _DROP_ORDER:
            if remaining <= 0:
                break
            cursor = self.connection.execute(
                "DELETE FROM queue WHERE id IN "
                "(SELECT id FROM queue WHERE variant = ? AND id > ? ORDER BY id LIMIT ?)",
                (variant, sent_up_to, remaining),
            )
            dropped += cursor.rowcount
            remaining -= cursor.rowcount
            if cursor.rowcount:
                # per variant too: a drop that reaches logs must not pass for lost data
                self._add_to_counter(f"dropped_{variant}", cursor.rowcount)
        self._add_to_counter("removed", dropped)
        self._add_to_counter("dropped", dropped)

    def _drop_for(self, destination: Destination, pending: int) -> None:
        """Bring one destination back under its cap: its oldest rows that
        cannot be in flight to it (data, then logs, then config answers) are
        released for it, counted as its drops, and noted for its gap record;
        the rows no destination keeps any more leave the queue."""
        name, bit = destination.name, destination.mask
        marks = {
            stream: self._read_counter(counter(mark, name)) for stream, mark in _STREAM_MARK.items()
        }
        live_from = self._read_counter(counter("live_from", name)) or marks["live"]
        (in_flight,) = self.connection.execute(
            "SELECT count(*) FROM queue WHERE (pending & ?) != 0 AND ("
            "(variant = 'data' AND (id <= ? OR (id > ? AND id <= ?))) "
            "OR (variant != 'data' AND id <= ?))",
            (bit, marks["data"], live_from, marks["live"], marks["priority"]),
        ).fetchone()
        excess = pending - int(in_flight) - destination.max_queued
        if excess <= 0:
            return
        self._flush_archive_in_transaction()  # dropped from the queue, not from the archive
        remaining = excess + max(1, destination.max_queued // 100)
        released: list[int] = []
        for variant in _DROP_ORDER:
            if remaining <= 0:
                break
            mark = marks["data" if variant == "data" else "priority"]
            # with a newest-first catch-up, what is in flight of the live data
            # (live_from, live mark] is left alone too
            live = (live_from, marks["live"]) if variant == "data" else (0, 0)
            dropped = self.connection.execute(
                "UPDATE queue SET pending = pending & ~? WHERE id IN (SELECT id FROM queue "
                "WHERE (pending & ?) != 0 AND variant = ? AND id > ? "
                "AND NOT (id > ? AND id <= ?) ORDER BY id LIMIT ?) "
                "RETURNING id, timestamp",
                (bit, bit, variant, mark, *live, remaining),
            ).fetchall()
            if not dropped:
                continue
            remaining -= len(dropped)
            released += [row_id for row_id, _ in dropped]
            for kind in (f"dropped_{variant}", "dropped"):
                self._add_to_counter(counter(kind, name), len(dropped))
                self._add_to_counter(kind, len(dropped))
            if variant == "data":
                self._note_gap(name, [timestamp for _, timestamp in dropped])
        self._add_to_counter(counter("released", name), len(released))
        self._delete_released(released)

    def _note_gap(self, name: str, timestamps: list[float]) -> None:
        first = int(min(timestamps) * 1000)
        last = int(max(timestamps) * 1000)
        count = self._add_to_counter(counter("gap_count", name), len(timestamps))
        if count == len(timestamps):  # a new gap
            self._set_counter(counter("gap_first_ms", name), first)
            self._set_counter(counter("gap_last_ms", name), last)
            return
        self._set_counter(
            counter("gap_first_ms", name),
            min(first, self._read_counter(counter("gap_first_ms", name))),
        )
        self._set_counter(
            counter("gap_last_ms", name),
            max(last, self._read_counter(counter("gap_last_ms", name))),
        )

    def _delete_released(self, row_ids: Sequence[int]) -> None:
        """Delete the rows among `row_ids` that no registered destination
        keeps any more (archived already: callers flush first)."""
        removed = 0
        for start in range(0, len(row_ids), _SQLITE_MAX_PARAMETERS):
            chunk = row_ids[start : start + _SQLITE_MAX_PARAMETERS]
            removed += self.connection.execute(
                f"DELETE FROM queue WHERE id IN ({','.join('?' * len(chunk))}) "  # noqa: S608
                "AND (pending & ?) = 0",
                (*chunk, self._live_mask),
            ).rowcount
        if removed:
            self._add_to_counter("removed", removed)

    def record_gap(
        self, destination: str, gap_body: Callable[[int, float, float], MessageBody]
    ) -> int:
        """If `destination`'s cap dropped data since it last heard of it, queue
        for it alone the record `gap_body(count, first, last)` (timestamps in
        seconds) and forget the gap, in one transaction, so that the record is
        sent exactly once; return the count (0: no gap). Called by a backend
        once its broker acknowledges again."""
        name = destination
        count = self._read_counter(counter("gap_count", name))
        if not count:
            return 0
        body = gap_body(
            count,
            self._read_counter(counter("gap_first_ms", name)) / 1000,
            self._read_counter(counter("gap_last_ms", name)) / 1000,
        )
        with self._transaction():
            if self._read_counter(counter("gap_count", name)) != count:
                return 0  # another drop came in between: next time, with it
            self._refresh_destinations()
            row = (time.time(), body.variant, self.config_revision)
            self.connection.execute(
                "INSERT INTO queue (timestamp, variant, config_revision, body, pending) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    *row,
                    body.__pydantic_serializer__.to_json(body).decode(),
                    self._destination(name).mask,
                ),
            )
            self._add_to_counter(counter("routed", name), 1)
            for kind in ("gap_count", "gap_first_ms", "gap_last_ms"):
                self._set_counter(counter(kind, name), 0)
        return count

    # --- sending ----------------------------------------------------------------

    def get_oldest_rows(
        self,
        n: int,
        excluded_message_ids: Iterable[int] = (),
        after_id: int = 0,
        destination: str | None = None,
        stream: Stream | None = None,
        up_to: int | None = None,
    ) -> list[QueueRow]:
        """The `n` oldest queued rows (FIFO) with an id above `after_id` (and
        at most `up_to`) that is not excluded, e.g. because they are already in
        flight; of one destination (the rows it still has to get), and of one
        of its streams (its logs and config answers, or its data), if given.
        Walks the primary key (the partial index for the logs and answers), so
        the cost depends on `n` and on how many rows it passes, not on the queue
        length. Called by the backend's drain loop and `ivy queue`."""
        excluded = set(excluded_message_ids)
        bit = self._destination(destination).mask if destination is not None else -1
        result: list[QueueRow] = []
        cursor_id = after_id
        query = (
            f"SELECT {_ROW_COLUMNS} FROM queue WHERE id > ? AND id <= ? "  # noqa: S608
            f"AND (pending & ?) != 0 {_STREAM_FILTER[stream]} ORDER BY id LIMIT ?"
        )
        last = up_to if up_to is not None else 2**63 - 1
        while len(result) < n:
            chunk = self.connection.execute(
                query, (cursor_id, last, bit, n - len(result) + min(len(excluded), 1_000))
            ).fetchall()
            if not chunk:
                break
            for row in chunk:
                if row[0] not in excluded:
                    result.append(QueueRow(*row))
                    if len(result) == n:
                        break
            cursor_id = chunk[-1][0]
        return result

    def get_n_latest_messages(
        self, n: int, excluded_message_ids: Iterable[int] = ()
    ) -> list[MessageQueueItem]:
        """The `n` oldest queued messages (the next to send; the reference API
        calls them "latest") not excluded, as validated `MessageQueueItem`s."""
        return [
            MessageQueueItem(
                identifier=row.id,
                message_identifier=self.identifier_of(row.id),
                timestamp=row.timestamp,
                config_revision=row.config_revision,
                body=json.loads(row.body),
            )
            for row in self.get_oldest_rows(n, excluded_message_ids)
        ]

    def remove_messages(self, message_ids: Iterable[int]) -> None:
        """Delete rows, whichever destination still waited for them (archiving
        them first if the main loop has not yet): the reference API's removal,
        for a station with one backend. Backends acknowledge with `acknowledge`."""
        message_ids = sorted(set(message_ids))
        if not message_ids:
            return
        with self._transaction():
            self._refresh_destinations()
            if message_ids[-1] > self._read_counter("archived_up_to"):
                self._flush_archive_in_transaction()
            removed = 0
            for start in range(0, len(message_ids), _SQLITE_MAX_PARAMETERS):
                chunk = message_ids[start : start + _SQLITE_MAX_PARAMETERS]
                marks = ",".join("?" * len(chunk))
                for destination in self.destinations.values():
                    (released,) = self.connection.execute(
                        f"SELECT count(*) FROM queue WHERE id IN ({marks}) "  # noqa: S608
                        "AND (pending & ?) != 0",
                        (*chunk, destination.mask),
                    ).fetchone()
                    if released:
                        self._add_to_counter(counter("released", destination.name), released)
                removed += self.connection.execute(
                    f"DELETE FROM queue WHERE id IN ({marks})",  # noqa: S608
                    chunk,
                ).rowcount
            self._add_to_counter("removed", removed)

    def acknowledge(self, destination: str, message_ids: Iterable[int]) -> None:
        """`destination`'s broker acknowledged these rows: release them for it;
        rows no other destination keeps leave the queue (archived first if the
        main loop has not archived them yet). Called by the backend."""
        message_ids = sorted(set(message_ids))
        if not message_ids:
            return
        with self._transaction():
            self._refresh_destinations()
            bit = self._destination(destination).mask
            if message_ids[-1] > self._read_counter("archived_up_to"):
                self._flush_archive_in_transaction()
            released = 0
            for start in range(0, len(message_ids), _SQLITE_MAX_PARAMETERS):
                chunk = message_ids[start : start + _SQLITE_MAX_PARAMETERS]
                released += self.connection.execute(
                    f"UPDATE queue SET pending = pending & ~? "  # noqa: S608
                    f"WHERE id IN ({','.join('?' * len(chunk))}) AND (pending & ?) != 0",
                    (bit, *chunk, bit),
                ).rowcount
            self._add_to_counter(counter("released", destination), released)
            self._delete_released(message_ids)

    def take_rows_to_send(
        self,
        n: int,
        excluded_message_ids: Iterable[int] = (),
        after_id: int = 0,
        destination: str | None = None,
        stream: Stream | None = None,
        up_to: int | None = None,
    ) -> list[QueueRow]:
        """`get_oldest_rows`, and the durable mark of how far they may be in
        flight moved past them in the same write transaction (`sent_up_to`, or
        the destination's mark of its stream): from now on they may reach the
        broker, so the size cap leaves them alone until they are acknowledged.
        Read and mark are one transaction because a producer's cap could
        otherwise drop a row between them that then goes out anyway, counted as
        dropped (one in the 30-minute soak)."""
        return self.take_stream_rows(
            n, excluded_message_ids, after_id, destination, stream, up_to
        ).rows

    def take_stream_rows(
        self,
        n: int,
        excluded_message_ids: Iterable[int] = (),
        after_id: int = 0,
        destination: str | None = None,
        stream: Stream | None = None,
        up_to: int | None = None,
    ) -> TakenRows:
        """`take_rows_to_send`, and how far the queue was looked at: when fewer
        than `n` rows came back, every row up to the newest (or `up_to`) was
        passed, so the caller's cursor skips the rows of other destinations
        and streams instead of walking them again on every poll. Called by the
        backend's drain loop."""
        if destination is None:
            mark = "sent_up_to"
        else:
            mark = counter(_STREAM_MARK[stream or "data"], destination)
        with self._transaction():
            self._refresh_destinations()
            rows = self.get_oldest_rows(
                n, excluded_message_ids, after_id, destination, stream, up_to
            )
            if rows and rows[-1].id > self._sent_up_to_seen.get(mark, 0):
                self.connection.execute(
                    "INSERT INTO counters (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                    (mark, rows[-1].id),
                )
            if len(rows) == n:
                looked_up_to = rows[-1].id
            else:
                (newest,) = self.connection.execute(
                    "SELECT coalesce(max(id), 0) FROM queue"
                ).fetchone()
                looked_up_to = max(
                    after_id, min(int(newest), up_to if up_to is not None else newest)
                )
        if rows:
            self._sent_up_to_seen[mark] = max(self._sent_up_to_seen.get(mark, 0), rows[-1].id)
        return TakenRows(rows, looked_up_to)

    def unfinished_live_catch_up(self, destination: str) -> int | None:
        """Where a newest-first catch-up that a backend began and did not end
        (it was stopped or killed) splits live data from the backlog, or None.
        A new backend process resumes it rather than beginning another, which
        would leave the live rows it sent unguarded from the size cap."""
        live_from = self._read_counter(counter("live_from", destination))
        return live_from or None

    def begin_live_catch_up(self, destination: str) -> int:
        """Newest-first catch-up: the data measured from now on (above the
        returned id) go before the backlog at or below it; the cap leaves what
        is in flight of either alone. Called by a backend that has a backlog."""
        with self._transaction():
            (newest,) = self.connection.execute("SELECT coalesce(max(id), 0) FROM queue").fetchone()
            self._set_counter(counter("live_from", destination), int(newest))
            self._set_counter(counter("live_sent_up_to", destination), int(newest))
        self._sent_up_to_seen[counter("live_sent_up_to", destination)] = int(newest)
        return int(newest)

    def end_live_catch_up(self, destination: str) -> None:
        """The backlog is out: the live data's mark becomes the data mark again."""
        with self._transaction():
            live_sent = self._read_counter(counter("live_sent_up_to", destination))
            self.connection.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                (counter("sent_up_to", destination), live_sent),
            )
            self._set_counter(counter("live_from", destination), 0)

    # --- inspecting -------------------------------------------------------------

    def get_queue_depth(self, destination: str | None = None) -> int:
        """Number of queued messages: all of them, or those `destination` has
        still to get. Called by `ivy status` and the backends."""
        if destination is not None:
            return self._read_counter(counter("routed", destination)) - self._read_counter(
                counter("released", destination)
            )
        row = self.connection.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'queue'), 0)"
        ).fetchone()
        return int(row[0]) - self._read_counter("removed")

    def get_dropped_count(self, variant: str | None = None, destination: str | None = None) -> int:
        """Messages (of one variant, or all) dropped by a size cap since the
        queue was created: for `destination`, exactly those it never got; else
        the drops of every destination together (of the station's own cap,
        without one). Called by the main loop (to log new drops) and `ivy status`."""
        name = "dropped" if variant is None else f"dropped_{variant}"
        return self._read_counter(name if destination is None else counter(name, destination))

    def count_poisoned(self, count: int) -> None:
        """Record rows that the broker would not take as they were (sent as an
        error instead). Called by the backend."""
        with self._transaction():
            self._add_to_counter("poisoned", count)

    def get_poisoned_count(self) -> int:
        """Poison rows since the queue was created. Called by `ivy status`."""
        return self._read_counter("poisoned")

    def _read_counter(self, name: str) -> int:
        row = self.connection.execute(
            "SELECT value FROM counters WHERE name = ?", (name,)
        ).fetchone()
        return int(row[0]) if row else 0

    def get_oldest_message_age(
        self, now: float | None = None, destination: str | None = None
    ) -> float | None:
        """Seconds since the oldest queued message (that `destination` still
        has to get) was produced, or None when there is none. Called by `ivy
        status`."""
        bit = self._destination(destination).mask if destination is not None else -1
        row = self.connection.execute(
            "SELECT timestamp FROM queue WHERE (pending & ?) != 0 ORDER BY id LIMIT 1", (bit,)
        ).fetchone()
        if row is None:
            return None
        return (time.time() if now is None else now) - float(row[0])

    # --- archive ----------------------------------------------------------------

    def flush_archive(self) -> int:
        """Append the queued rows not yet archived to the daily JSONL files
        (fsynced) and advance the mark; return the number of lines written.
        Called by the main loop every few seconds and at shutdown. A crash
        between the append and the commit can write a line twice;
        `load_message_archive` drops such duplicates."""
        with self._transaction():
            return self._flush_archive_in_transaction()

    def _flush_archive_in_transaction(self) -> int:
        # another process may have registered a destination since: rows kept
        # only for it must not look kept for nobody
        self._refresh_destinations()
        written = 0
        archived_up_to = self._read_counter("archived_up_to")
        day = _UtcDay()
        while True:
            rows = self.connection.execute(
                f"SELECT {_ROW_COLUMNS} FROM queue WHERE id > ? ORDER BY id LIMIT ?",  # noqa: S608
                (archived_up_to, _ARCHIVE_FLUSH_BATCH),
            ).fetchall()
            if not rows:
                return written
            lines_per_day: dict[str, list[str]] = {}
            for row, line in zip(rows, self._archive_lines(rows), strict=True):
                lines_per_day.setdefault(day.of(row[1]), []).append(line)
            for name, lines in lines_per_day.items():
                self._append_to_archive_file(name, lines)
            first_id, archived_up_to = rows[0][0], rows[-1][0]
            self.connection.execute(
                "UPDATE counters SET value = ? WHERE name = 'archived_up_to'", (archived_up_to,)
            )
            written += len(rows)
            if self._live_mask:
                # rows of a variant no destination takes were kept only for the archive
                removed = self.connection.execute(
                    "DELETE FROM queue WHERE id >= ? AND id <= ? AND (pending & ?) = 0",
                    (first_id, archived_up_to, self._live_mask),
                ).rowcount
                if removed:
                    self._add_to_counter("removed", removed)

    def _archive_lines(self, rows: Sequence[tuple[int, float, str, int, str]]) -> list[str]:
        """The JSONL archive lines of queue rows, one comprehension per batch
        (a call per line halved the flush rate)."""
        prefix = self.identifier_prefix
        return [
            f'{{"identifier":"{prefix}-{row_id}","timestamp":{timestamp!r},'
            f'"config_revision":{revision},"body":{body}}}'
            for row_id, timestamp, _, revision, body in rows
        ]

    def _append_to_archive_file(self, date: str, lines: list[str]) -> None:
        path = os.path.join(self.archive_dir, f"{date}.jsonl")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # a power loss or a full disk during an earlier append can leave
            # half a line; ours must start on a line of its own, or the first
            # of them would be glued to that half and lost to every reader
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            content = memoryview(
                ("\n" if torn else "").encode() + ("\n".join(lines) + "\n").encode()
            )
            # a nearly full disk takes part of a write without an error; the
            # rest must raise (ENOSPC), or the batch would count as archived
            while content:
                content = content[os.write(fd, content) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def load_message_archive(
        date: datetime.date | str, queue_path: str | None = None, archive_dir: str | None = None
    ) -> list[MessageArchiveItem]:
        """Every archived message of a UTC day, in the order written: the JSONL
        file plus the queued rows not yet flushed to it. Lines that do not parse
        (a torn last line after a power loss) are skipped. Called by tests and
        operators."""
        agent = MessagingAgent(None, queue_path, archive_dir)
        try:
            return agent._load_archive_day(date)
        finally:
            agent.close()

    def unarchived_lines(self, since: float, until: float) -> list[str]:
        """Archive lines of the queued messages measured in [since, until) that
        the main loop has not appended to the archive files yet. Called by
        archive readers (`load_message_archive`, `ivy messages`)."""
        return self._archive_lines(
            self.connection.execute(
                f"SELECT {_ROW_COLUMNS} FROM queue "  # noqa: S608
                "WHERE id > ? AND timestamp >= ? AND timestamp < ? ORDER BY id",
                (self._read_counter("archived_up_to"), since, until),
            ).fetchall()
        )

    def _load_archive_day(self, date: datetime.date | str) -> list[MessageArchiveItem]:
        day = datetime.date.fromisoformat(date) if isinstance(date, str) else date
        lines: list[str] = []
        path = os.path.join(self.archive_dir, f"{day.isoformat()}.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines.extend(f.read().splitlines())
        day_start = datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc)
        lines += self.unarchived_lines(day_start.timestamp(), day_start.timestamp() + 86_400)
        items: list[MessageArchiveItem] = []
        seen: set[str] = set()
        for line in lines:
            try:
                item = MessageArchiveItem.model_validate_json(line)
            except pydantic.ValidationError:
                continue
            if item.message_identifier not in seen:
                seen.add(item.message_identifier)
                items.append(item)
        return items
