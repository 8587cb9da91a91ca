"""What `ivy status` shows, as typed records: the main loop, the config, the
broker connection, the queue, the disk, an update in progress, the trust
policy's meaning, every child, and the reasons the station counts as unhealthy.
`ivy status --json` prints `StationStatus` as it is."""

from __future__ import annotations

import pydantic
from pydantic import Field

from .state import BackendConnectionState, ProcessState, UpdateProgress


class MainloopStatus(pydantic.BaseModel):
    """The main loop, when it runs."""

    pid: int | None = None
    uptime_seconds: float | None = None
    heartbeat_age_seconds: float | None = None


class ConfigStatus(pydantic.BaseModel):
    """`config/config.json` as the station would load it."""

    valid: bool
    revision: int | None = None
    software_version: str | None = None
    system_identifier: str | None = None
    backend: str | None = None
    error: str | None = None


class QueueStatus(pydantic.BaseModel):
    """The message queue."""

    depth: int
    oldest_age_seconds: float | None
    dropped: int
    poisoned: int


class DestinationStatus(pydantic.BaseModel):
    """One destination (backend): its connection as its backend last reported
    it (which address, and why that one), and what it has still to get."""

    provider: str
    connection: BackendConnectionState | None
    backlog: int
    oldest_age_seconds: float | None
    dropped: int


class DiskStatus(pydantic.BaseModel):
    """The data directory's partition."""

    free_gb: float
    used_percent: float


class StationStatus(pydantic.BaseModel):
    """The station at a glance."""

    running: bool
    version: str
    mainloop: MainloopStatus
    config: ConfigStatus
    backend_connection: BackendConnectionState | None
    destinations: dict[str, DestinationStatus] = Field(default_factory=dict)
    queue: QueueStatus
    disk: DiskStatus
    update: UpdateProgress | None
    trust: list[str]
    processes: dict[str, ProcessState]
    problems: list[str] = Field(default_factory=list)
