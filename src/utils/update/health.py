"""When is a station healthy after a change? One definition for a new config
and for a new software version, read from the shared state that the main loop
and the backend write:

- the main loop has written a heartbeat since the change, and recently;
- every procedure and the backend is alive, has not restarted since the
  change, and has run for `stable_seconds`;
- every destination (backend) configured is connected and its broker has
  acknowledged a message since the change (the new main loop's startup
  message, or the config's own acknowledgement), unless nothing was due for
  it since its backend started (a destination that gets only data, on a
  station that has measured nothing since: there is nothing to acknowledge,
  and a good config must not fail for that).

"Since the change" means: different from the state read just before the
change. "Recently" and "has run for" are measured on this process's monotonic
clock, from when the judge first saw the value. No wall-clock time from the
state is compared with another, so a clock stepped back by NTP during a trial
cannot make a healthy station look stale (and roll a good change back).

A crash loop is fatal at once; anything else may still come right until the
trial's deadline. Used by the main loop (config trials) and by the guard
(version trials)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from src.types import State
from src.types.config import LEGACY_DESTINATION, destination_process_name
from src.types.state import BackendConnectionState

# the main loop writes one every 10 s; three missed ones mean it hangs
HEARTBEAT_STALE_SECONDS = 35.0


def fatal_problem(state: State) -> str | None:
    """A reason to give up at once: a child in a crash loop."""
    for name, process in sorted(state.processes.items()):
        if process.crash_looping:
            return f"{name} is crash-looping: {process.last_error or 'no error recorded'}"
    return None


class HealthWatch:
    """The judge of one trial: created from the state read just before the
    change (before any child of the changed station starts), then shown each
    new state. Created and polled by the main loop (config trials) and by the
    guard (version trials)."""

    def __init__(self, before: State, stable_seconds: float, destinations: Sequence[str]) -> None:
        """Judge against `before`, the state just before the change, with the
        destinations (by name) the changed config has."""
        self.before = before
        self.stable_seconds = stable_seconds
        self.destinations = list(destinations)
        self._heartbeat: tuple[float, float] | None = None  # value, monotonic when first seen
        self._running_since: dict[tuple[str, float], float] = {}  # (name, started_at) -> seen

    def problem(self, state: State, now: float | None = None) -> str | None:
        """None when `state` is healthy by the definition above; else what is
        still missing, in words for an operator. `now` is a monotonic time."""
        now = time.monotonic() if now is None else now
        for name, process in state.processes.items():
            if process.started_at is not None:
                self._running_since.setdefault((name, process.started_at), now)
        heartbeat = state.mainloop.last_heartbeat
        if (
            state.mainloop.pid is None
            or heartbeat is None
            or heartbeat == self.before.mainloop.last_heartbeat
        ):
            return "the main loop has not written a heartbeat since the change"
        if self._heartbeat is None or self._heartbeat[0] != heartbeat:
            self._heartbeat = (heartbeat, now)
        if now - self._heartbeat[1] > HEARTBEAT_STALE_SECONDS:
            return f"the main loop has written no heartbeat for {now - self._heartbeat[1]:.0f} s"
        fatal = fatal_problem(state)
        if fatal is not None:
            return fatal
        for destination in self.destinations:
            if destination_process_name(destination) not in state.processes:
                return f"{_backend_of(destination)} has not started"
        for name, process in sorted(state.processes.items()):
            if not process.alive:
                return f"{name} is not running ({process.last_error or 'no error recorded'})"
            if process.restarts > 0:
                return f"{name} restarted {process.restarts} time(s): {process.last_error}"
        for destination in self.destinations:
            connection, before = (
                _connection(state, destination),
                _connection(self.before, destination),
            )
            # a report the state held before the change is the previous backend's
            fresh = connection is not None and (before is None or connection.since != before.since)
            if connection is None or not fresh or not connection.connected:
                detail = (
                    connection.detail if (connection is not None and fresh) else "no report since"
                )
                return f"{_backend_of(destination)} is not connected to the broker ({detail})"
        for name, process in sorted(state.processes.items()):
            previous = self.before.processes.get(name)
            started = process.started_at
            if started is None or (previous is not None and previous.started_at == started):
                return f"{name} has not started since the change"
            if now - self._running_since[(name, started)] < self.stable_seconds:
                return f"{name} has not run for {self.stable_seconds:.0f} s yet"
        for destination in self.destinations:
            connection, before = (
                _connection(state, destination),
                _connection(self.before, destination),
            )
            if connection is not None and connection.idle:
                continue
            acknowledged = connection.last_acknowledgment if connection is not None else None
            if acknowledged is None or (
                before is not None and acknowledged == before.last_acknowledgment
            ):
                broker = (
                    "the broker"
                    if destination == LEGACY_DESTINATION
                    else f"the broker of destination {destination}"
                )
                return f"{broker} has not acknowledged a message since the change"
        return None


def _backend_of(destination: str) -> str:
    if destination == LEGACY_DESTINATION:
        return "the backend"
    return f"the backend of destination {destination}"


def _connection(state: State, destination: str) -> BackendConnectionState | None:
    """A destination's connection report; the `backend` one also where
    versions before destinations wrote it."""
    found = state.destinations.get(destination)
    if found is None and destination == LEGACY_DESTINATION:
        return state.backend_connection
    return found
