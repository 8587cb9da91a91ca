"""The operator's record of rollouts (SQLite, default
`~/.local/state/ivy/fleet.sqlite3`): each rollout's change, revision and
plan, and per station its wave, what was on its config topic before (what a
halt puts back), what was sent and how it ended. A rollout whose process was
killed (or whose laptop slept) resumes from here; whether a halt came in
between is decided inside one write transaction with each send, so that no
station starts a change after `ivy fleet halt` returned."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Literal

from src.utils.sqlite_transaction import immediate_transaction

RolloutState = Literal["running", "halted", "done"]
# waiting: not sent yet; sent: on its config topic, no answer yet; accepted,
# rejected, no_answer (reachable when sent, silent past the answer timeout);
# not_sent: the rollout halted before its wave; withdrawn: sent, no answer,
# and its previous config put back on its topic by a halt
TargetStatus = Literal[
    "waiting", "sent", "accepted", "rejected", "no_answer", "not_sent", "withdrawn"
]

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        inventory TEXT NOT NULL,
        kind TEXT NOT NULL,
        change TEXT NOT NULL,
        change_digest TEXT NOT NULL,
        revision INTEGER NOT NULL,
        plan TEXT NOT NULL,
        state TEXT NOT NULL,
        rolls_back INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS targets (
        rollout INTEGER NOT NULL,
        station TEXT NOT NULL,
        position INTEGER NOT NULL,
        wave INTEGER NOT NULL,
        status TEXT NOT NULL,
        previous_payload BLOB,
        sent_payload BLOB,
        digest TEXT,
        sent_at REAL,
        reachable_at_send INTEGER,
        answered_at REAL,
        reason TEXT,
        PRIMARY KEY (rollout, station)
    ) WITHOUT ROWID""",
]


def default_store_path() -> str:
    """`$XDG_STATE_HOME/ivy/fleet.sqlite3` (`~/.local/state/ivy/...`)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "ivy", "fleet.sqlite3")


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout (or rollback) as stored."""

    id: int
    created_at: float
    inventory: str
    kind: Literal["patch", "revert"]
    change: Any
    change_digest: str
    revision: int
    plan: dict[str, Any]
    state: RolloutState
    rolls_back: int | None


@dataclass(frozen=True)
class Target:
    """One station of a rollout as stored."""

    station: str
    position: int
    wave: int
    status: TargetStatus
    previous_payload: bytes | None
    sent_payload: bytes | None
    digest: str | None
    sent_at: float | None
    reachable_at_send: bool | None
    answered_at: float | None
    reason: str | None


class RolloutStore:
    """The rollout database; every process opens its own."""

    def __init__(self, path: str | None = None) -> None:
        """Open (and create) the store at `path` (default: `default_store_path`)."""
        self.path = path or default_store_path()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # the operator's alone (SQLite gives its -wal and -shm files the same mode)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self.connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        with self._transaction():
            for statement in _SCHEMA:
                self.connection.execute(statement)

    def close(self) -> None:
        """Close the database."""
        self.connection.close()

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return immediate_transaction(self.connection)

    def create(
        self,
        *,
        inventory: str,
        kind: Literal["patch", "revert"],
        change: Any,
        change_digest: str,
        revision: int,
        plan: dict[str, Any],
        waves: list[list[str]],
        rolls_back: int | None = None,
    ) -> int:
        """Record a new rollout and its stations wave by wave; return its id."""
        with self._transaction():
            cursor = self.connection.execute(
                "INSERT INTO rollouts (created_at, inventory, kind, change, change_digest, "
                "revision, plan, state, rolls_back) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (
                    time.time(),
                    inventory,
                    kind,
                    json.dumps(change),
                    change_digest,
                    revision,
                    json.dumps(plan),
                    rolls_back,
                ),
            )
            rollout = int(cursor.lastrowid or 0)
            position = 0
            for wave, stations in enumerate(waves):
                for station in stations:
                    self.connection.execute(
                        "INSERT INTO targets (rollout, station, position, wave, status) "
                        "VALUES (?, ?, ?, ?, 'waiting')",
                        (rollout, station, position, wave),
                    )
                    position += 1
        return rollout

    def rollout(self, rollout: int) -> RolloutRecord | None:
        """One rollout, or None."""
        row = self.connection.execute(
            "SELECT id, created_at, inventory, kind, change, change_digest, revision, plan, "
            "state, rolls_back FROM rollouts WHERE id = ?",
            (rollout,),
        ).fetchone()
        if row is None:
            return None
        return RolloutRecord(
            id=row[0],
            created_at=row[1],
            inventory=row[2],
            kind=row[3],
            change=json.loads(row[4]),
            change_digest=row[5],
            revision=row[6],
            plan=json.loads(row[7]),
            state=row[8],
            rolls_back=row[9],
        )

    def latest(
        self, state: RolloutState | None = None, change_digest: str | None = None
    ) -> RolloutRecord | None:
        """The newest rollout (in `state`, of the change `change_digest`), or None."""
        row = self.connection.execute(
            "SELECT id FROM rollouts WHERE (? IS NULL OR state = ?) "
            "AND (? IS NULL OR change_digest = ?) ORDER BY id DESC LIMIT 1",
            (state, state, change_digest, change_digest),
        ).fetchone()
        return None if row is None else self.rollout(int(row[0]))

    def highest_revision(self) -> int:
        """The highest revision any rollout sent (0: none)."""
        (value,) = self.connection.execute(
            "SELECT coalesce(max(revision), 0) FROM rollouts"
        ).fetchone()
        return int(value)

    def targets(self, rollout: int) -> list[Target]:
        """Every station of a rollout in its planned order."""
        return [
            Target(
                station=row[0],
                position=row[1],
                wave=row[2],
                status=row[3],
                previous_payload=row[4],
                sent_payload=row[5],
                digest=row[6],
                sent_at=row[7],
                reachable_at_send=None if row[8] is None else bool(row[8]),
                answered_at=row[9],
                reason=row[10],
            )
            for row in self.connection.execute(
                "SELECT station, position, wave, status, previous_payload, sent_payload, digest, "
                "sent_at, reachable_at_send, answered_at, reason FROM targets "
                "WHERE rollout = ? ORDER BY position",
                (rollout,),
            )
        ]

    def state(self, rollout: int) -> RolloutState:
        """The rollout's state now."""
        (value,) = self.connection.execute(
            "SELECT state FROM rollouts WHERE id = ?", (rollout,)
        ).fetchone()
        return str(value)  # type: ignore[return-value]

    def mark_sent(
        self,
        rollout: int,
        station: str,
        *,
        previous_payload: bytes | None,
        sent_payload: bytes,
        digest: str,
        reachable: bool,
    ) -> bool:
        """Record that `station` is about to get the change (before it is
        published); False, and nothing recorded, when it was recorded already
        (another process runs this rollout) or the rollout is no longer
        running (a halt came first)."""
        with self._transaction():
            if self.state(rollout) != "running":
                return False
            changed = self.connection.execute(
                "UPDATE targets SET status = 'sent', previous_payload = ?, sent_payload = ?, "
                "digest = ?, sent_at = ?, reachable_at_send = ? "
                "WHERE rollout = ? AND station = ? AND status = 'waiting'",
                (
                    previous_payload,
                    sent_payload,
                    digest,
                    time.time(),
                    int(reachable),
                    rollout,
                    station,
                ),
            ).rowcount
        return changed == 1

    def move_to_wave(self, rollout: int, station: str, wave: int) -> None:
        """Move a waiting station into an earlier wave."""
        with self._transaction():
            self.connection.execute(
                "UPDATE targets SET wave = ? WHERE rollout = ? AND station = ? "
                "AND status = 'waiting'",
                (wave, rollout, station),
            )

    def answer(self, rollout: int, station: str, status: TargetStatus, reason: str | None) -> None:
        """Record how a sent station's change ended."""
        with self._transaction():
            self.connection.execute(
                "UPDATE targets SET status = ?, reason = ?, answered_at = ? "
                "WHERE rollout = ? AND station = ?",
                (status, reason, time.time(), rollout, station),
            )

    def halt(self, rollout: int, reason: str) -> list[Target]:
        """Stop the rollout: no further station starts it (waiting ones become
        not_sent); return the sent ones without an answer, whose previous
        config is to be put back (see `withdrawn`)."""
        with self._transaction():
            self.connection.execute(
                "UPDATE rollouts SET state = 'halted' WHERE id = ? AND state = 'running'",
                (rollout,),
            )
            self.connection.execute(
                "UPDATE targets SET status = 'not_sent', reason = ? "
                "WHERE rollout = ? AND status = 'waiting'",
                (reason, rollout),
            )
        return [t for t in self.targets(rollout) if t.status == "sent"]

    def withdrawn(self, rollout: int, station: str) -> None:
        """A sent station's previous config is back on its topic (only if it
        has not answered meanwhile)."""
        with self._transaction():
            self.connection.execute(
                "UPDATE targets SET status = 'withdrawn', answered_at = ? "
                "WHERE rollout = ? AND station = ? AND status = 'sent'",
                (time.time(), rollout, station),
            )

    def finish(self, rollout: int) -> None:
        """A running rollout that sent everything and heard back: done."""
        with self._transaction():
            self.connection.execute(
                "UPDATE rollouts SET state = 'done' WHERE id = ? AND state = 'running'",
                (rollout,),
            )
