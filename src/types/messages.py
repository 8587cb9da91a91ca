"""Message bodies that procedures produce and the records that wrap them in the
queue and in the archive."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from .config import LogLevel, Revision, general_field_of, redact_secrets, revision_of

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class DataMessageBody(pydantic.BaseModel):
    """Measured values, keyed by quantity name. Booleans stay booleans;
    integers must fit in 64 bits and floats must be finite, because no backend
    (JSON, ThingsBoard's longs) can carry anything else."""

    model_config = pydantic.ConfigDict(extra="forbid")
    variant: Literal["data"] = "data"
    data: dict[
        Annotated[str, Field(min_length=1, max_length=128)], bool | int | FiniteFloat | str
    ] = Field(..., min_length=1)

    @pydantic.field_validator("data", mode="before")
    @classmethod
    def _integers_fit_in_64_bits(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
                    raise ValueError(f"{key!r}: integer {value} does not fit in 64 bits")
        return data


class LogMessageBody(pydantic.BaseModel):
    """A log line that the logger forwards to the backend."""

    model_config = pydantic.ConfigDict(extra="forbid")
    variant: Literal["log"] = "log"
    level: LogLevel
    subject: str = Field(..., max_length=512)
    body: str = Field("", max_length=65_536)


ConfigStatus = Literal["received", "progress", "accepted", "rejected", "startup"]
# where a software update stands, in ThingsBoard's OTA vocabulary (`sw_state`)
SoftwareUpdateState = Literal[
    "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED", "FAILED"
]


class ConfigMessageBody(pydantic.BaseModel):
    """The station's answer to a config: received, one step of a software
    update done (`progress`, with the step and its duration), accepted,
    rejected (with a reason), or the config it started with. `config` never
    holds secrets, and a rejection never holds the config at all: it names
    what it rejected by `digest` (SHA-256 of what arrived), so that a flood of
    bad configs cannot fill the disk. `software_update` is set on the answers
    about a config that changes the software version."""

    model_config = pydantic.ConfigDict(extra="forbid")
    variant: Literal["config"] = "config"
    status: ConfigStatus
    config_revision: Revision | None
    software_version: str | None = Field(..., max_length=64)
    reason: str | None = None
    step: str | None = Field(None, max_length=32)
    step_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    software_update: SoftwareUpdateState | None = None
    digest: str | None = Field(None, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def about(
        cls,
        status: ConfigStatus,
        config: Any,
        reason: str | None = None,
        *,
        step: str | None = None,
        step_seconds: float | None = None,
        software_update: SoftwareUpdateState | None = None,
        digest: str | None = None,
    ) -> ConfigMessageBody:
        """The answer about a config given as JSON data: its revision and
        version where they can be read, and its content with every secret
        redacted, except in a rejection, which carries `digest` instead.
        Called by the updater and the main loop."""
        version = general_field_of(config, "software_version")
        return cls(
            status=status,
            config_revision=revision_of(config),
            software_version=version if isinstance(version, str) and len(version) <= 32 else None,
            reason=reason,
            step=step,
            step_seconds=None if step_seconds is None else round(step_seconds, 3),
            software_update=software_update,
            digest=digest,
            config=(
                redact_secrets(config) if isinstance(config, dict) and status != "rejected" else {}
            ),
        )


MessageBody = Annotated[
    DataMessageBody | LogMessageBody | ConfigMessageBody, Field(discriminator="variant")
]


class MessageArchiveItem(pydantic.BaseModel):
    """One line of `messages/YYYY-MM-DD.jsonl`. `identifier` is stable across
    redeliveries so that receivers can drop duplicates; `timestamp` is the unix
    time at which the procedure produced the message."""

    identifier: str
    timestamp: float
    config_revision: int
    body: MessageBody


class MessageQueueItem(MessageArchiveItem):
    """A queued message; `id` is its row in the queue, in FIFO order."""

    id: int
