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
    config_revision: Revision | None = None
    software_version: str | None = Field(None, max_length=64)
    reason: str | None = None
    step: str | None = Field(None, max_length=32)
    step_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    software_update: SoftwareUpdateState | None = None
    digest: str | None = Field(None, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _from_a_config_object(cls, data: Any) -> Any:
        """Ivy 1.1 answers with `ConfigMessageBody(status=...,
        config=config.to_foreign_config())`: a config object's revision and
        version become the answer's, and its secrets are redacted."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), pydantic.BaseModel):
            return data
        config = data["config"]
        raw = config.to_dict() if hasattr(config, "to_dict") else config.model_dump(mode="json")
        version = general_field_of(raw, "software_version")
        return {
            "config_revision": revision_of(raw),
            "software_version": version if isinstance(version, str) else None,
            **data,
            "config": redact_secrets(raw) if data.get("status") != "rejected" else {},
        }

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
    """One line of `messages/YYYY-MM-DD.jsonl`. `message_identifier` (the
    line's `identifier`) is `<per-station prefix>-<row id>`, stable across
    redeliveries, so that receivers can drop duplicates; `timestamp` is the
    unix time at which the procedure produced the message; `message_body` is
    Ivy 1.1's name for `body`."""

    model_config = pydantic.ConfigDict(populate_by_name=True)
    message_identifier: str = Field(
        validation_alias=pydantic.AliasChoices("message_identifier", "identifier"),
        serialization_alias="identifier",
    )
    timestamp: float
    config_revision: int
    body: MessageBody

    @property
    def message_body(self) -> DataMessageBody | LogMessageBody | ConfigMessageBody:
        """The body, by Ivy 1.1's name."""
        return self.body


class MessageQueueItem(MessageArchiveItem):
    """A queued message; `identifier` is its row in the queue (an integer, in
    FIFO order), what `remove_messages` and `excluded_message_ids` take."""

    identifier: int

    @property
    def id(self) -> int:
        """The row id, by the name this project used before Ivy 1.1's."""
        return self.identifier
