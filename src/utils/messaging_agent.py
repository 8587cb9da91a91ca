"""The durable message queue (SQLite, WAL) and the daily message archive.

`add_message` commits the queue row and an archive-outbox row in one SQLite
transaction, so one fsync makes the message durable in both. The outbox is then
appended to `messages/YYYY-MM-DD.jsonl` in batches (`flush_archive`, run by the
main loop every few seconds), one fsync per batch; `load_message_archive` reads
the file and the outbox together, so nothing is missing in between. This keeps
`add_message` close to the cost of a raw SQLite commit instead of paying a
second fsync for the archive file.

Every process opens its own `MessagingAgent`; SQLite's locking serializes them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import pydantic

from src import constants
from src.types import Config, MessageArchiveItem, MessageBody, MessageQueueItem, StorageConfig

from .functions import utc_date_string

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identifier TEXT NOT NULL,
    timestamp REAL NOT NULL,
    variant TEXT NOT NULL,
    config_revision INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS archive_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    date TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) SELECT 'queued', count(*) FROM queue;
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
"""

# the order in which the size cap drops messages: data first, config answers last
_DROP_ORDER = ("data", "log", "config")
_SQLITE_MAX_PARAMETERS = 900
_ARCHIVE_FLUSH_BATCH = 5_000


class QueueRow(NamedTuple):
    """A queued message as stored: the body stays JSON text, so that a backend
    can forward it without a round trip through pydantic."""

    id: int
    identifier: str
    timestamp: float
    variant: str
    config_revision: int
    body: str


class MessagingAgent:
    """One process's handle on the queue and the archive."""

    def __init__(
        self,
        config: Config | None = None,
        queue_path: str | None = None,
        archive_dir: str | None = None,
    ) -> None:
        """Open (and create) the queue. Called by every process that produces or
        sends messages, once at its start."""
        storage = config.storage if config is not None else StorageConfig()
        self.config_revision = config.general.config_revision if config is not None else 0
        self.max_queued_messages = storage.max_queued_messages
        queue_path = queue_path or constants.MESSAGE_QUEUE_PATH
        archive_dir = archive_dir or constants.MESSAGE_ARCHIVE_DIR
        self.archive_dir = archive_dir
        os.makedirs(os.path.dirname(os.path.abspath(queue_path)), exist_ok=True)
        os.makedirs(archive_dir, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below)
        self.connection = sqlite3.connect(queue_path, timeout=60, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute(f"PRAGMA synchronous={storage.sqlite_synchronous}")
        self.connection.execute("PRAGMA busy_timeout=60000")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.connection.execute(statement)

    def close(self) -> None:
        """Close the connection; the agent cannot be used afterwards."""
        self.connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception: a failed add
        leaves neither a queue row nor an archive row behind."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    # --- producing -------------------------------------------------------------

    def add_message(self, body: MessageBody, timestamp: float | None = None) -> str:
        """Queue and archive one message; return its identifier once both are
        durable on disk. Called by procedures, the logger and the updater."""
        return self.add_messages([body], timestamp)[0]

    def add_messages(
        self, bodies: Sequence[MessageBody], timestamp: float | None = None
    ) -> list[str]:
        """Queue and archive many messages in one transaction (one fsync); return
        their identifiers in order. Called by procedures that measure in bursts."""
        now = time.time() if timestamp is None else timestamp
        date = utc_date_string(now)
        revision = self.config_revision
        queue_rows: list[tuple[str, float, str, int, str]] = []
        archive_rows: list[tuple[str, str]] = []
        for body in bodies:
            identifier = uuid.uuid4().hex
            body_json = body.model_dump_json()
            queue_rows.append((identifier, now, body.variant, revision, body_json))
            archive_rows.append(
                (
                    date,
                    f'{{"identifier":"{identifier}","timestamp":{now!r},'
                    f'"config_revision":{revision},"body":{body_json}}}',
                )
            )
        with self._transaction():
            self.connection.executemany(
                "INSERT INTO queue (identifier, timestamp, variant, config_revision, body) "
                "VALUES (?, ?, ?, ?, ?)",
                queue_rows,
            )
            self.connection.executemany(
                "INSERT INTO archive_outbox (date, line) VALUES (?, ?)", archive_rows
            )
            queued = self._add_to_counter("queued", len(queue_rows))
            if queued > self.max_queued_messages:
                self._drop_oldest(queued - self.max_queued_messages)
        return [row[0] for row in queue_rows]

    def _add_to_counter(self, name: str, delta: int) -> int:
        row = self.connection.execute(
            "UPDATE counters SET value = value + ? WHERE name = ? RETURNING value", (delta, name)
        ).fetchone()
        return int(row[0])

    def _drop_oldest(self, excess: int) -> None:
        # drop a little more than needed so that a full queue does not pay for
        # this on every single add
        remaining = excess + max(1, self.max_queued_messages // 100)
        dropped = 0
        for variant in _DROP_ORDER:
            if remaining <= 0:
                break
            cursor = self.connection.execute(
                "DELETE FROM queue WHERE id IN "
                "(SELECT id FROM queue WHERE variant = ? ORDER BY id LIMIT ?)",
                (variant, remaining),
            )
            dropped += cursor.rowcount
            remaining -= cursor.rowcount
        self._add_to_counter("queued", -dropped)
        self._add_to_counter("dropped", dropped)

    # --- sending ----------------------------------------------------------------

    def get_n_latest_rows(self, n: int, excluded_message_ids: Iterable[int] = ()) -> list[QueueRow]:
        """The `n` oldest queued rows (FIFO) whose id is not excluded, e.g. because
        they are already in flight. Walks the primary key from the oldest row, so
        the cost depends on `n` and on how many excluded rows it passes, not on
        the queue length. Called by the backend's drain loop."""
        excluded = set(excluded_message_ids)
        result: list[QueueRow] = []
        cursor_id = 0
        while len(result) < n:
            chunk = self.connection.execute(
                "SELECT id, identifier, timestamp, variant, config_revision, body FROM queue "
                "WHERE id > ? ORDER BY id LIMIT ?",
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
        """Like `get_n_latest_rows`, as validated `MessageQueueItem`s."""
        return [
            MessageQueueItem(
                id=row.id,
                identifier=row.identifier,
                timestamp=row.timestamp,
                config_revision=row.config_revision,
                body=json.loads(row.body),
            )
            for row in self.get_n_latest_rows(n, excluded_message_ids)
        ]

    def remove_messages(self, message_ids: Sequence[int]) -> None:
        """Delete rows whose delivery the broker has acknowledged. Ids that are
        already gone (dropped by the size cap) are ignored. Called by the backend."""
        if not message_ids:
            return
        with self._transaction():
            removed = 0
            for start in range(0, len(message_ids), _SQLITE_MAX_PARAMETERS):
                chunk = message_ids[start : start + _SQLITE_MAX_PARAMETERS]
                removed += self.connection.execute(
                    f"DELETE FROM queue WHERE id IN ({','.join('?' * len(chunk))})",  # noqa: S608
                    chunk,
                ).rowcount
            self._add_to_counter("queued", -removed)

    # --- inspecting -------------------------------------------------------------

    def get_queue_depth(self) -> int:
        """Number of queued (unacknowledged) messages. Called by `ivy status`."""
        return self._read_counter("queued")

    def get_dropped_count(self) -> int:
        """Messages dropped by the size cap since the queue was created."""
        return self._read_counter("dropped")

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
        """Append the archive outbox to the daily JSONL files (fsynced) and empty
        it; return the number of lines written. Called by the main loop every few
        seconds and at shutdown. A crash between the append and the commit can
        write a line twice; `load_message_archive` drops such duplicates."""
        written = 0
        while True:
            with self._transaction():
                rows = self.connection.execute(
                    "SELECT id, date, line FROM archive_outbox ORDER BY id LIMIT ?",
                    (_ARCHIVE_FLUSH_BATCH,),
                ).fetchall()
                if not rows:
                    return written
                lines_per_date: dict[str, list[str]] = {}
                for _, date, line in rows:
                    lines_per_date.setdefault(date, []).append(line)
                for date, lines in lines_per_date.items():
                    self._append_to_archive_file(date, lines)
                self.connection.execute("DELETE FROM archive_outbox WHERE id <= ?", (rows[-1][0],))
                written += len(rows)

    def _append_to_archive_file(self, date: str, lines: list[str]) -> None:
        path = os.path.join(self.archive_dir, f"{date}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, ("\n".join(lines) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_message_archive(self, date: datetime.date | str) -> list[MessageArchiveItem]:
        """Every archived message of a UTC day, in the order written: the JSONL file
        plus what still waits in the outbox. Lines that do not parse (a torn last
        line after a power loss) are skipped. Called by tests and operators."""
        date_string = date if isinstance(date, str) else date.isoformat()
        lines: list[str] = []
        path = os.path.join(self.archive_dir, f"{date_string}.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines.extend(f.read().splitlines())
        lines.extend(
            row[0]
            for row in self.connection.execute(
                "SELECT line FROM archive_outbox WHERE date = ? ORDER BY id", (date_string,)
            )
        )
        items: list[MessageArchiveItem] = []
        seen: set[str] = set()
        for line in lines:
            try:
                item = MessageArchiveItem.model_validate_json(line)
            except pydantic.ValidationError:
                continue
            if item.identifier not in seen:
                seen.add(item.identifier)
                items.append(item)
        return items
