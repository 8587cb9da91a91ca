"""The one way Ivy writes to its SQLite files (the queue, the fleet's
rollout store): explicit transactions on a connection opened with
`isolation_level=None`."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def immediate_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (the write lock at once, so that a read and the write
    that depends on it cannot be split by another process) ... COMMIT,
    rolled back on any exception: all of it or nothing."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
