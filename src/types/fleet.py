"""What a station tells the fleet about itself over its broker, and the topics
it uses: `ivy/<id>/state` (retained, a `StationReport`, small and bounded:
updated on change and every few minutes) and `ivy/<id>/presence` (retained,
`{"online": bool, "at": ...}`; the broker's last will says offline when the
station vanishes). `ivy fleet` reads both; Tenta ignores topics it does not
know."""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

import pydantic
from pydantic import Field

STATE_FORMAT: Literal["ivy-station-state/1"] = "ivy-station-state/1"
# a report stays far below any broker's packet limit
MAX_PROBLEMS = 10
MAX_TEXT_CHARS = 500

# a report is read by the operator's tool: every figure in it is bounded, so
# that a forged one cannot crash it (a forged report can still claim a
# station is fine: the broker's ACL is what keeps strangers off these topics)
UnixSeconds = Annotated[float, Field(ge=0, lt=2**33, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


def state_topic(station: str) -> str:
    """The retained topic of a station's state report."""
    return f"ivy/{station}/state"


def presence_topic(station: str) -> str:
    """The retained topic of a station's presence (online, or offline by its
    last will)."""
    return f"ivy/{station}/presence"


def presence_payload(online: bool, at: float | None = None) -> bytes:
    """The presence message (the last will says offline without a time)."""
    body: dict[str, object] = {"online": online}
    if at is not None:
        body["at"] = round(at, 3)
    return json.dumps(body).encode()


def clipped(text: str | None) -> str | None:
    """`text` cut to the report's bound."""
    if text is None or len(text) <= MAX_TEXT_CHARS:
        return text
    return text[: MAX_TEXT_CHARS - 1] + "…"


class ConfigAnswerReport(pydantic.BaseModel):
    """How the station's newest verified config ended (or where it is)."""

    revision: int = Field(..., ge=0, lt=2**31)
    status: str = Field(..., max_length=32)
    reason: Text | None = None
    at: UnixSeconds


class RefusalReport(pydantic.BaseModel):
    """The newest config refused on arrival (unsigned, bad signature, not for
    this station, replayed): only its digest, so that the sender can tell its
    own payload from anyone else's."""

    digest: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    reason: Text
    at: UnixSeconds


class StationReport(pydantic.BaseModel):
    """One station's state as `ivy fleet status` shows it."""

    format: Literal["ivy-station-state/1"] = STATE_FORMAT
    station: str = Field(..., max_length=64)
    version: str = Field(..., max_length=64)
    config_revision: int | None = Field(..., ge=0, lt=2**31)
    running: bool
    healthy: bool
    problems: list[Text] = Field(default_factory=list, max_length=MAX_PROBLEMS)
    backlog: int = Field(..., ge=0)
    oldest_unsent_age_seconds: Annotated[float, Field(allow_inf_nan=False)] | None = None
    last_config: ConfigAnswerReport | None = None
    last_refused: RefusalReport | None = None
    reported_at: UnixSeconds = Field(default_factory=time.time)

    def fingerprint(self) -> str:
        """The report without its time and the fast-moving backlog figures:
        a change in it is worth a publish at once."""
        return self.model_dump_json(exclude={"reported_at", "backlog", "oldest_unsent_age_seconds"})
