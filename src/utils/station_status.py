"""The station at a glance, for `ivy status`: main loop, config, broker
connection, queue, disk and every child, gathered from the state file and the
queue; and the rules that call a running station unhealthy."""

from __future__ import annotations

import time

import psutil

from src import constants
from src.types import Config, ConfigError
from src.types.config import LEGACY_DESTINATION
from src.types.status import (
    ConfigStatus,
    DestinationStatus,
    DiskStatus,
    MainloopStatus,
    QueueStatus,
    StationStatus,
)

from . import mainloop_toggle
from .messaging_agent import MessagingAgent
from .state_interface import StateInterface
from .update.trust import TrustError, load_policy, summary

_RESTART_GRACE = 120.0  # seconds a dead child may wait for its restart (backoff)
# `ivy status`'s health thresholds unless told otherwise (the state reports use them)
DEFAULT_MAX_DISCONNECTED_SECONDS = 600.0
DEFAULT_MAX_QUEUE_AGE_SECONDS = 3600.0


def collect_status(agent: MessagingAgent | None = None) -> StationStatus:
    """Everything `ivy status` shows (its problems not judged yet, see
    `health_problems`), read through `agent` if given (else a queue
    connection of its own, closed again). Called by the CLI and by the
    backend's state report."""
    state = StateInterface.load()
    now = time.time()
    pid = mainloop_toggle.get_mainloop_pid()
    running = pid is not None
    destinations: dict[str, DestinationStatus] = {}
    try:
        config = Config.load()
        config_status = ConfigStatus(
            valid=True,
            revision=config.general.config_revision,
            software_version=config.general.software_version.root,
            system_identifier=config.general.system_identifier,
            backend=config.backend.provider if config.backend else None,
        )
    except ConfigError as e:
        config_status = ConfigStatus(valid=False, error=str(e))
    own_agent = agent is None
    if agent is None:
        agent = MessagingAgent()
    try:
        queue = QueueStatus(
            depth=agent.get_queue_depth(),
            oldest_age_seconds=agent.get_oldest_message_age(now),
            dropped=agent.get_dropped_count(),
            poisoned=agent.get_poisoned_count(),
        )
        if config_status.valid:
            for name, section in config.destinations().items():
                registered = name in agent.destinations
                destinations[name] = DestinationStatus(
                    provider=section.provider,
                    connection=state.destinations.get(name) if running else None,
                    backlog=agent.get_queue_depth(name) if registered else 0,
                    oldest_age_seconds=(
                        agent.get_oldest_message_age(now, name) if registered else None
                    ),
                    dropped=agent.get_dropped_count(destination=name) if registered else 0,
                )
    finally:
        if own_agent:
            agent.close()
    disk = psutil.disk_usage(constants.DATA_DIR)
    mainloop = state.mainloop
    return StationStatus(
        running=running,
        version=constants.VERSION.root,
        mainloop=MainloopStatus(
            pid=pid,
            uptime_seconds=(now - mainloop.started_at)
            if (running and mainloop.started_at)
            else None,
            heartbeat_age_seconds=(now - mainloop.last_heartbeat)
            if (running and mainloop.last_heartbeat)
            else None,
        ),
        config=config_status,
        backend_connection=state.backend_connection
        if (running and config_status.backend and state.backend_connection is not None)
        else None,
        destinations=destinations,
        queue=queue,
        disk=DiskStatus(free_gb=disk.free / 1e9, used_percent=disk.percent),
        update=state.update_in_progress if running else None,
        trust=trust_lines(),
        processes={
            name: process if running else process.model_copy(update={"alive": False, "pid": None})
            for name, process in state.processes.items()
        },
    )


def trust_lines() -> list[str]:
    """What the trust policy lets in, a line each (`trust.summary`); a policy
    that cannot be read says so."""
    try:
        return summary(load_policy())
    except TrustError as e:
        return [f"the trust policy cannot be read, so no remote config is taken: {e}"]


def health_problems(
    status: StationStatus,
    max_disconnected_seconds: float = DEFAULT_MAX_DISCONNECTED_SECONDS,
    max_queue_age_seconds: float = DEFAULT_MAX_QUEUE_AGE_SECONDS,
) -> list[str]:
    """Why a running station is unhealthy (empty: healthy): a child dead or
    crash-looping, the backend disconnected for longer than allowed, the
    oldest unsent message older than allowed. Called by `ivy status`."""
    if not status.running:
        return []
    problems: list[str] = []
    now = time.time()
    for name, process in status.processes.items():
        if process.crash_looping:
            problems.append(f"{name} is crash-looping ({process.last_error})")
        elif not process.alive and now - (process.last_error_at or 0) > _RESTART_GRACE:
            # a child that just died is being restarted: only a stuck one counts
            problems.append(f"{name} is not alive ({process.last_error or 'no error recorded'})")
    for name, destination in status.destinations.items():
        which = "the backend" if name == LEGACY_DESTINATION else f"destination {name}"
        connection = destination.connection
        if connection is not None and not connection.connected:
            down_for = now - (connection.since or now)
            if down_for > max_disconnected_seconds:
                problems.append(
                    f"{which} has been disconnected for {down_for:.0f} s ({connection.detail})"
                )
        age = destination.oldest_age_seconds
        if age is not None and age > max_queue_age_seconds:
            unsent = (
                "the oldest unsent message"
                if name == LEGACY_DESTINATION
                else (f"the oldest message destination {name} has not got")
            )
            problems.append(f"{unsent} is {age:.0f} s old")
    return problems
