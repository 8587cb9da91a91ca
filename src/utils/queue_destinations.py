"""The destinations of the one message queue: each backend a station sends to
(its config's `backend`, named "backend", and every `backends.<name>`) has a
bit in each row's `pending` mask, set while that destination still has to get
the row. A destination clears its bit when its broker acknowledged the row or
its own size cap dropped it; a row leaves the queue when no destination's bit
is left (and it is archived). So one destination that is down for days keeps
its own rows, never another's, and each keeps its own counters, keyed by its
stable name (never by a hash of its settings):

- `routed@<name>`: rows ever routed to it; `released@<name>`: acknowledged or
  dropped for it (pending = routed - released);
- `dropped@<name>` (and `dropped_<variant>@<name>`): dropped by its cap, exactly
  the rows it never got; `gap_*@<name>`: the data dropped since it last heard
  of it (count, first and last timestamp in ms), for its gap record;
- `sent_up_to@<name>`, `sent_priority_up_to@<name>`: how far its data and its
  logs and config answers may be in flight (the cap never drops those).

Rows written while no destination is registered (a station without a
backend, or a version before destinations) have every bit set, so the
destinations registered into an empty registry get what waited for them; a
destination added beside others starts with nothing pending. SQL helpers for
`MessagingAgent`, which calls them inside its transactions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import NamedTuple

MAX_DESTINATIONS = 62  # bits of a signed 64-bit integer, the sign bit left alone
VARIANTS = ("data", "log", "config")
EVERY_DESTINATION = -1  # all bits: pending for whoever is registered


class Destination(NamedTuple):
    """A registered destination: its bit in `queue.pending`, the variants it
    gets and its size cap."""

    name: str
    bit: int
    variants: frozenset[str]
    max_queued: int

    @property
    def mask(self) -> int:
        """The destination's bit as a mask."""
        return 1 << self.bit


def counter(kind: str, name: str) -> str:
    """The counter `kind@name` of a destination."""
    return f"{kind}@{name}"


def load(connection: sqlite3.Connection) -> dict[str, Destination]:
    """Every registered destination by name."""
    return {
        name: Destination(name, int(bit), frozenset(json.loads(variants)), int(max_queued))
        for name, bit, variants, max_queued in connection.execute(
            "SELECT name, bit, variants, max_queued FROM destinations ORDER BY bit"
        )
    }


def live_mask(destinations: Iterable[Destination]) -> int:
    """The bits of the registered destinations."""
    mask = 0
    for destination in destinations:
        mask |= destination.mask
    return mask


def routing(destinations: Mapping[str, Destination]) -> dict[str, int]:
    """variant -> the `pending` mask a new row of it gets: the bits of the
    destinations that take that variant, or every bit while none is
    registered (so that the first one gets what waited for it)."""
    if not destinations:
        return dict.fromkeys(VARIANTS, EVERY_DESTINATION)
    return {
        variant: live_mask(d for d in destinations.values() if variant in d.variants)
        for variant in VARIANTS
    }


def register(
    connection: sqlite3.Connection,
    name: str,
    variants: frozenset[str],
    max_queued: int,
    registered: Mapping[str, Destination],
    takes_waiting_rows: bool,
) -> Destination:
    """Add (or update the settings of) a destination. A new one gets the
    lowest free bit and, unless `takes_waiting_rows`, nothing already queued."""
    existing = registered.get(name)
    if existing is not None:
        connection.execute(
            "UPDATE destinations SET variants = ?, max_queued = ? WHERE name = ?",
            (json.dumps(sorted(variants)), max_queued, name),
        )
        return existing._replace(variants=variants, max_queued=max_queued)
    used = {d.bit for d in registered.values()}
    free = [bit for bit in range(MAX_DESTINATIONS) if bit not in used]
    if not free:
        raise ValueError(f"more than {MAX_DESTINATIONS} destinations")
    destination = Destination(name, free[0], variants, max_queued)
    if not takes_waiting_rows:
        connection.execute(
            "UPDATE queue SET pending = pending & ~? WHERE pending & ?",
            (destination.mask, destination.mask),
        )
    (routed,) = connection.execute(
        "SELECT count(*) FROM queue WHERE pending & ?", (destination.mask,)
    ).fetchone()
    connection.execute(
        "INSERT INTO destinations (name, bit, variants, max_queued) VALUES (?, ?, ?, ?)",
        (name, destination.bit, json.dumps(sorted(variants)), max_queued),
    )
    for kind in ("routed", "released"):
        _set(connection, counter(kind, name), routed if kind == "routed" else 0)
    if takes_waiting_rows:
        # a backend of a version before destinations moved the station-wide
        # mark: what it may have in flight stays guarded from this one's cap
        (sent_up_to,) = connection.execute(
            "SELECT coalesce(max(value), 0) FROM counters WHERE name = 'sent_up_to'"
        ).fetchone()
        for mark in ("sent_up_to", "sent_priority_up_to"):
            _set(connection, counter(mark, name), int(sent_up_to))
    return destination


def recount(connection: sqlite3.Connection, destination: Destination) -> None:
    """Set a destination's counters from its rows (pending = routed -
    released), whatever wrote the queue in between: a version before
    destinations, gone back to and forward again, adds and removes rows
    without them."""
    (pending,) = connection.execute(
        "SELECT count(*) FROM queue WHERE pending & ?", (destination.mask,)
    ).fetchone()
    released = connection.execute(
        "SELECT value FROM counters WHERE name = ?", (counter("released", destination.name),)
    ).fetchone()
    _set(
        connection,
        counter("routed", destination.name),
        int(pending) + int(released[0] if released else 0),
    )


def _set(connection: sqlite3.Connection, name: str, value: int) -> None:
    connection.execute(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def unregister(connection: sqlite3.Connection, destination: Destination) -> int:
    """Forget a destination: its bit is cleared from every row (so its rows
    are no longer kept for it) and its counters go. Returns how many rows it
    had not got."""
    released = connection.execute(
        "UPDATE queue SET pending = pending & ~? WHERE pending & ?",
        (destination.mask, destination.mask),
    ).rowcount
    connection.execute("DELETE FROM destinations WHERE name = ?", (destination.name,))
    connection.execute(
        "DELETE FROM counters WHERE name LIKE ? ESCAPE '\\'",
        ("%@" + destination.name.replace("%", "\\%").replace("_", "\\_"),),
    )
    return released
