"""When is a station healthy after a change? One definition for a new config
and for a new software version, read from the shared state that the main loop
and the backend write:

- the main loop has written a heartbeat since the change, and recently;
- every procedure and the backend is alive, has not restarted since the
  change, and has run for `stable_seconds`;
- with a backend configured, it is connected and the broker has acknowledged
  a message since the change (the new main loop's startup message, or the
  config's own acknowledgement).

A crash loop is fatal at once; anything else may still come right until the
trial's deadline. Used by the main loop (config trials) and by the guard
(version trials)."""

from __future__ import annotations

import time

from src.types import State

# the main loop writes one every 10 s; three missed ones mean it hangs
HEARTBEAT_STALE_SECONDS = 35.0


def fatal_problem(state: State) -> str | None:
    """A reason to give up at once: a child in a crash loop."""
    for name, process in sorted(state.processes.items()):
        if process.crash_looping:
            return f"{name} is crash-looping: {process.last_error or 'no error recorded'}"
    return None


def health_problem(
    state: State,
    since: float,
    stable_seconds: float,
    needs_broker: bool,
    now: float | None = None,
) -> str | None:
    """None when the station is healthy by the definition above for a change
    made at `since`; else what is still missing, in words for an operator."""
    now = time.time() if now is None else now
    heartbeat = state.mainloop.last_heartbeat
    if state.mainloop.pid is None or heartbeat is None or float(heartbeat) < since:
        return "the main loop has not written a heartbeat since the change"
    if now - float(heartbeat) > HEARTBEAT_STALE_SECONDS:
        return f"the main loop's last heartbeat is {now - float(heartbeat):.0f} s old"
    fatal = fatal_problem(state)
    if fatal is not None:
        return fatal
    if needs_broker and "backend" not in state.processes:
        return "the backend has not started"
    for name, process in sorted(state.processes.items()):
        if not process.alive:
            return f"{name} is not running ({process.last_error or 'no error recorded'})"
        if process.restarts > 0:
            return f"{name} restarted {process.restarts} time(s): {process.last_error}"
    connection = state.backend_connection
    # a report from before the change is the previous backend's
    fresh = connection is not None and float(connection.since or 0) >= since
    if needs_broker and (connection is None or not fresh or not connection.connected):
        detail = connection.detail if (connection is not None and fresh) else "no report since"
        return f"the backend is not connected to the broker ({detail})"
    for name, process in sorted(state.processes.items()):
        started = process.started_at
        if started is None or float(started) < since or now - float(started) < stable_seconds:
            return f"{name} has not run for {stable_seconds:.0f} s yet"
    if needs_broker and connection is not None:
        acknowledged = connection.last_acknowledgment
        if acknowledged is None or float(acknowledged) < since:
            return "the broker has not acknowledged a message since the change"
    return None
