"""The shared state file (`data/state.json`) that every process reads and the
main loop, the procedures and the backend update.

Every assignment is validated where it happens (`validate_assignment`), so a
procedure that writes a wrong type gets the error itself, naming the field and
the value; unknown keys (another version's) are ignored when reading.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import Field

from .config import ForeignConfig


class _StateModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(validate_assignment=True)


def _unix_time(value: Any) -> Any:
    """datetimes (as in the reference API's own example) become unix seconds."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.astimezone()  # a naive datetime is local time
        return value.timestamp()
    return value


# typed to take a datetime too (the reference API's example assigns one); what
# is stored, and read back, is always unix seconds
UnixTime = Annotated[float | datetime.datetime, pydantic.BeforeValidator(_unix_time)]


class MainloopState(_StateModel):
    """Which main loop owns this installation, and when it last looked around."""

    pid: int | None = None
    started_at: float | None = None
    last_heartbeat: float | None = None
    # the process that judges a version on trial (and holds the lock for it)
    guard_pid: int | None = None


class ProcessState(_StateModel):
    """One supervised child as the main loop last saw it."""

    variant: str
    pid: int | None = None
    alive: bool = False
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    crash_looping: bool = False
    started_at: float | None = None


class BackendConnectionState(_StateModel):
    """The backend's MQTT connection as it last reported it."""

    connected: bool = False
    detail: str = ""
    since: float | None = None
    broker: str = ""
    last_acknowledgment: float | None = None
    # connected, and nothing was due for this destination since its backend
    # started: no acknowledgment can be expected yet (a data-only destination
    # of a station that has measured nothing since)
    idle: bool = False


class SystemState(_StateModel):
    """The latest readings of the system_checks procedure."""

    last_updated: UnixTime | None = None
    last_boot_time: UnixTime | None = None
    load_averages: tuple[float, float, float] | None = None
    # Ivy 1.1's name: the 5-minute load average per CPU, in percent
    last_5_min_load: float | None = None
    cpu_usage_percent: float | None = None
    memory_usage_percent: float | None = None
    disk_free_gb: float | None = None
    disk_usage_percent: float | None = None
    cpu_temperature_c: float | None = None


class UpdateProgress(_StateModel):
    """The software update the main loop's worker is busy with."""

    version: str
    config_revision: int
    step: str
    started_at: float
    step_started_at: float


class PendingConfig(_StateModel):
    """A config waiting for the main loop's updater, with where it came from:
    `remote` (over MQTT, verified on arrival against the trust policy) or
    `local` (`ivy config apply`: whoever runs it is trusted already).
    `signed_at`, the signed ordering value of a signed config (None when
    unsigned), decides whether it is newer than the last one handled; `digest`
    (SHA-256 of what arrived) names it in answers. `patch`, for a signed
    merge patch: `config` is the patch merged into the config running when it
    arrived, and the updater merges it again into the config running when it
    is applied (a trial in between may have changed or rolled back that)."""

    config: ForeignConfig
    origin: Literal["remote", "local"]
    digest: str = ""
    signed_at: float | None = None
    signer: str | None = None
    patch: dict[str, Any] | None = None


class ConfigOutcome(_StateModel):
    """How a config ended (what `ivy config apply` reports)."""

    config_revision: int
    software_version: str
    status: str
    reason: str | None = None
    at: float


class ConfigRefusal(_StateModel):
    """A config refused on arrival (never verified): its digest and why."""

    digest: str
    reason: str
    at: float


# procedure name -> the model of its own state section, registered by
# `src.procedures` (this layer cannot import procedures)
_PROCEDURE_STATES: dict[str, type[pydantic.BaseModel]] = {}

StateT = TypeVar("StateT", bound=pydantic.BaseModel)


def register_procedure_states(models: Mapping[str, type[pydantic.BaseModel]]) -> None:
    """Make `State` validate one section per procedure that declares a state
    model. Called by `src.procedures` once it has discovered them."""
    _PROCEDURE_STATES.update(models)


class State(_StateModel):
    """The sections below, plus one per procedure that declares a state model
    (`procedure_state`). Unknown keys are kept as they are, so that another
    version's state file still loads."""

    model_config = pydantic.ConfigDict(validate_assignment=True, extra="allow")

    mainloop: MainloopState = Field(default_factory=MainloopState)
    processes: dict[str, ProcessState] = Field(default_factory=dict)
    system: SystemState = Field(default_factory=SystemState)
    # the `backend` destination's connection (what versions before
    # destinations read), and every destination's by name
    backend_connection: BackendConnectionState | None = None
    destinations: dict[str, BackendConnectionState] = Field(default_factory=dict)
    # configs for the updater, oldest first (bounded). `pending_configs` is
    # what versions before the trust policy queued; read, never written
    pending: list[PendingConfig] = Field(default_factory=list)
    pending_configs: list[ForeignConfig] = Field(default_factory=list)
    # the signed ordering value of the newest signed config handled (accepted
    # or rejected): a signed config is new only when signed later, whatever
    # its revision, so that replays and huge revisions lock nobody out
    newest_signed_config_at: float | None = Field(None, allow_inf_nan=False)
    # the highest config revision that was accepted: a remote config must be
    # newer. Only accepted configs move it, so that a rejected config with an
    # absurd revision cannot lock out every later one.
    highest_handled_config_revision: int | None = None
    # recently rejected revisions, so that a retained config is not judged (and
    # answered) again at every reconnect; bounded, newest last
    rejected_config_revisions: list[int] = Field(default_factory=list)
    update_in_progress: UpdateProgress | None = None
    # the last configs' outcomes, newest last (bounded)
    config_outcomes: list[ConfigOutcome] = Field(default_factory=list)
    # the newest config refused on arrival, for the station's state report
    last_refused_config: ConfigRefusal | None = None

    @pydantic.model_validator(mode="after")
    def _procedure_sections(self) -> State:
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for name, model in _PROCEDURE_STATES.items():
            value = extra.get(name)
            if value is not None and not isinstance(value, model):
                try:
                    extra[name] = model.model_validate(value)
                except pydantic.ValidationError:
                    extra[name] = model()  # one procedure's bad section, not the whole file
        return self

    def procedure_state(self, name: str, model: type[StateT]) -> StateT:
        """The state section of procedure `name` (defaults when there is none
        yet); changes to it are written with the rest of the state. Called by
        procedures inside `StateInterface.update()`."""
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        value = extra.get(name)
        if not isinstance(value, model):
            value = model.model_validate(value) if isinstance(value, dict) else model()
            extra[name] = value
        return value
