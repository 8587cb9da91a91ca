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
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

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

from .functions import utc_date_string

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
QUEUE_SCHEMA_VERSION = 1

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

# the order in which the size cap drops messages: data first, config answers last
# schema version -> the statements that migrate the version before it to it
_MIGRATIONS: dict[int, list[str]] = {1: _SCHEMA}

_DROP_ORDER = ("data", "log", "config")
_SQLITE_MAX_PARAMETERS = 900
_ARCHIVE_FLUSH_BATCH = 5_000
_ROW_COLUMNS = "id, timestamp, variant, config_revision, body"


class QueueRow(NamedTuple):
    """A queued message as stored: the body stays JSON text, so that a backend
    can forward it without a round trip through pydantic."""

    id: int
    timestamp: float
    variant: str
    config_revision: int
    body: str


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
        self._sent_up_to_seen = 0  # the mark as far as this process moved it

    def _migrate(self) -> None:
        """Bring the schema up to `QUEUE_SCHEMA_VERSION`, inside the caller's
        transaction (all steps or none); a newer database is left alone."""
        found = int(self.connection.execute("PRAGMA user_version").fetchone()[0])
        for version in range(found + 1, QUEUE_SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception: a failed add
        leaves no row behind."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def identifier_of(self, row_id: int) -> str:
        """The stable identifier of the message in row `row_id`."""
        return f"{self.identifier_prefix}-{row_id}"

    # --- producing -------------------------------------------------------------

    def add_message(self, message_body: MessageBody, timestamp: float | None = None) -> str:
        """Queue and archive one message; return its identifier once it is
        durable on disk. Called by procedures, the logger and the updater."""
        return self.add_messages([message_body], timestamp)[0]

    def add_messages(
        self, bodies: Sequence[MessageBody], timestamp: float | None = None
    ) -> list[str]:
        """Queue and archive many messages in one transaction (one fsync); return
        their identifiers in order. Called by procedures that measure in bursts."""
        if not bodies:
            return []
        now = time.time() if timestamp is None else _checked_timestamp(timestamp)
        revision = self.config_revision
        # what model_dump_json() calls, without its per-call argument handling:
        # this is the hot path of every procedure
        rows = [
            (now, body.variant, revision, body.__pydantic_serializer__.to_json(body).decode())
            for body in bodies
        ]
        with self._transaction():
            self.connection.executemany(
                "INSERT INTO queue (timestamp, variant, config_revision, body) VALUES (?, ?, ?, ?)",
                rows,
            )
            # AUTOINCREMENT under BEGIN IMMEDIATE: this transaction's ids are
            # contiguous and end at last_insert_rowid(), which is also the
            # number of rows ever inserted
            last_id, removed = self.connection.execute(
                "SELECT last_insert_rowid(), value FROM counters WHERE name = 'removed'"
            ).fetchone()
            queued = last_id - removed
            if queued > self.max_queued_messages:
                self._drop_oldest_unsent(queued)
        prefix = self.identifier_prefix
        return [f"{prefix}-{i}" for i in range(last_id - len(rows) + 1, last_id + 1)]

    def _add_to_counter(self, name: str, delta: int) -> int:
        # an upsert: counters added after schema version 1 need no migration
        row = self.connection.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value RETURNING value",
            (name, delta),
        ).fetchone()
        return int(row[0])

    def _drop_oldest_unsent(self, queued: int) -> None:
        """Bring the rows not yet handed to a publish back under the cap,
        oldest first (data, then logs, then config answers). Rows up to the
        `sent_up_to` mark are never dropped: they may have reached the broker
        already, and a dropped row must be one it never got, or the `dropped`
        count would lie. They are at most the backend's in-flight window."""
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

    # --- sending ----------------------------------------------------------------

    def get_oldest_rows(
        self, n: int, excluded_message_ids: Iterable[int] = (), after_id: int = 0
    ) -> list[QueueRow]:
        """The `n` oldest queued rows (FIFO) with an id above `after_id` that is
        not excluded, e.g. because they are already in flight. Walks the primary
        key, so the cost depends on `n` and on how many excluded rows it passes,
        not on the queue length. Called by the backend's drain loop."""
        excluded = set(excluded_message_ids)
        result: list[QueueRow] = []
        cursor_id = after_id
        while len(result) < n:
            chunk = self.connection.execute(
                f"SELECT {_ROW_COLUMNS} FROM queue WHERE id > ? ORDER BY id LIMIT ?",  # noqa: S608
                (cursor_id, n - len(result) + min(len(excluded), 1_000)),
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
        """Delete rows whose delivery the broker has acknowledged (archiving them
        first if the main loop has not yet). Called by the backend."""
        message_ids = list(set(message_ids))
        if not message_ids:
            return
        with self._transaction():
            if max(message_ids) > self._read_counter("archived_up_to"):
                self._flush_archive_in_transaction()
            removed = 0
            for start in range(0, len(message_ids), _SQLITE_MAX_PARAMETERS):
                chunk = message_ids[start : start + _SQLITE_MAX_PARAMETERS]
                removed += self.connection.execute(
                    f"DELETE FROM queue WHERE id IN ({','.join('?' * len(chunk))})",  # noqa: S608
                    chunk,
                ).rowcount
            self._add_to_counter("removed", removed)

    def take_rows_to_send(
        self, n: int, excluded_message_ids: Iterable[int] = (), after_id: int = 0
    ) -> list[QueueRow]:
        """`get_oldest_rows`, and the durable `sent_up_to` mark moved past them
        in the same write transaction: from now on they may reach the broker, so
        the size cap leaves them alone until they are acknowledged. Read and
        mark are one transaction because a producer's cap could otherwise drop
        a row between them that then goes out anyway, counted as dropped (one
        in the 30-minute soak). Called by the backend's drain loop."""
        with self._transaction():
            rows = self.get_oldest_rows(n, excluded_message_ids, after_id)
            if rows and rows[-1].id > self._sent_up_to_seen:
                self.connection.execute(
                    "INSERT INTO counters (name, value) VALUES ('sent_up_to', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                    (rows[-1].id,),
                )
        if rows:
            self._sent_up_to_seen = max(self._sent_up_to_seen, rows[-1].id)
        return rows

    # --- inspecting -------------------------------------------------------------

    def get_queue_depth(self) -> int:
        """Number of queued (unacknowledged) messages. Called by `ivy status`."""
        row = self.connection.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'queue'), 0)"
        ).fetchone()
        return int(row[0]) - self._read_counter("removed")

    def get_dropped_count(self, variant: str | None = None) -> int:
        """Messages (of one variant, or all) dropped by the size cap since the
        queue was created. Called by the main loop (to log new drops) and `ivy status`."""
        return self._read_counter("dropped" if variant is None else f"dropped_{variant}")

    def count_poisoned(self, count: int) -> None:
        """Record rows that the broker would not take as they were (sent as an
        error instead, or dropped). Called by the backend."""
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

    def get_oldest_message_age(self, now: float | None = None) -> float | None:
        """Seconds since the oldest queued message was produced, or None when the
        queue is empty. Called by `ivy status`."""
        row = self.connection.execute("SELECT timestamp FROM queue ORDER BY id LIMIT 1").fetchone()
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
            archived_up_to = rows[-1][0]
            self.connection.execute(
                "UPDATE counters SET value = ? WHERE name = 'archived_up_to'", (archived_up_to,)
            )
            written += len(rows)

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
