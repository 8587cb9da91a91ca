"""The shared state file (`data/state.json`) that every process reads and the
main loop, the procedures and the backend update."""

from __future__ import annotations

import pydantic
from pydantic import Field

from .config import ForeignConfig


class MainloopState(pydantic.BaseModel):
    """Which main loop owns this installation, and when it last looked around."""

    pid: int | None = None
    started_at: float | None = None
    last_heartbeat: float | None = None


class ProcessState(pydantic.BaseModel):
    """One supervised child as the main loop last saw it."""

    variant: str
    pid: int | None = None
    alive: bool = False
    restarts: int = 0
    last_error: str | None = None
    started_at: float | None = None


class SystemState(pydantic.BaseModel):
    """The latest readings of the system_checks procedure."""

    last_updated: float | None = None
    last_boot_time: float | None = None
    load_averages: tuple[float, float, float] | None = None
    cpu_usage_percent: float | None = None
    memory_usage_percent: float | None = None
    disk_free_gb: float | None = None
    disk_usage_percent: float | None = None
    cpu_temperature_c: float | None = None


class DummyProcedureState(pydantic.BaseModel):
    """The latest value of the dummy procedure's random walk."""

    last_value: float | None = None
    last_measurement_time: float | None = None


class State(pydantic.BaseModel):
    """Unknown keys are ignored so that another version's state file still loads."""

    mainloop: MainloopState = Field(default_factory=MainloopState)
    processes: dict[str, ProcessState] = Field(default_factory=dict)
    system: SystemState = Field(default_factory=SystemState)
    dummy_procedure: DummyProcedureState = Field(default_factory=DummyProcedureState)
    pending_configs: list[ForeignConfig] = Field(default_factory=list)
    # the highest config revision that was accepted: a remote config must be
    # newer. Only accepted configs move it, so that a rejected config with an
    # absurd revision cannot lock out every later one.
    highest_handled_config_revision: int | None = None
    # recently rejected revisions, so that a retained config is not judged (and
    # answered) again at every reconnect; bounded, newest last
    rejected_config_revisions: list[int] = Field(default_factory=list)
