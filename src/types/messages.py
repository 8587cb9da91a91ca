"""Message bodies that procedures produce and the records that wrap them in the
queue and in the archive."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from .config import LogLevel

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class DataMessageBody(pydantic.BaseModel):
    """Measured values, keyed by quantity name."""

    model_config = pydantic.ConfigDict(extra="forbid")
    variant: Literal["data"] = "data"
    data: dict[Annotated[str, Field(min_length=1, max_length=128)], FiniteFloat | int | str] = (
        Field(..., min_length=1)
    )


class LogMessageBody(pydantic.BaseModel):
    """A log line that the logger forwards to the backend."""

    model_config = pydantic.ConfigDict(extra="forbid")
    variant: Literal["log"] = "log"
    level: LogLevel
    subject: str = Field(..., max_length=512)
    body: str = Field("", max_length=65_536)


class ConfigMessageBody(pydantic.BaseModel):
    """The station's answer to a config: received, accepted, rejected (with a
    reason), or the config it started with. `config` never holds secrets."""

    model_config = pydantic.ConfigDict(extra="forbid")
    variant: Literal["config"] = "config"
    status: Literal["received", "accepted", "rejected", "startup"]
    config_revision: int | None
    software_version: str | None
    reason: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


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
