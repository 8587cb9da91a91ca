"""What the real servers accept, written down from their own source (DESIGN §11)
so that no test can pass with a payload a real server would drop. The test
subscriber runs every payload it receives through `check_payload`.

Tenta (`iterize/tenta`, `server/app/validation/`): pydantic models with
`strict=True, extra="forbid"`; each topic's payload is one list of at least one
item, so one bad item drops the whole publish after the broker's PUBACK.

ThingsBoard (MQTT device API, `JsonConverter`, `thingsboard.yml`): telemetry is
an array of `{"ts": ms, "values": {...}}`; values are strings, booleans,
numbers (integers must fit a Java long), JSON objects or arrays; an MQTT packet
larger than 65,536 bytes closes the connection.

`ivy fleet` (`src/fleet/broker.py`) is the reader of Ivy's own topics: it
ignores a state report that `StationReport` does not validate or that names
another station, and presence that is not `{"online": bool, "at": seconds}`;
so a station publishing one would vanish from the fleet's view.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

# --- Tenta ----------------------------------------------------------------------

_INT4 = 2**31
TentaKey = Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9](_?[a-z0-9])*$")]
TentaRevision = Annotated[int, Field(ge=0, lt=_INT4)]
TentaTimestamp = Annotated[float, Field(ge=0, lt=_INT4)]
TENTA_IDENTIFIER = r"^[a-f0-9]{8}-[a-f0-9]{4}-4[a-f0-9]{3}-[89ab][a-f0-9]{3}-[a-f0-9]{12}$"


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")


class TentaAcknowledgment(_Strict):
    success: bool
    timestamp: TentaTimestamp
    revision: TentaRevision


class TentaMeasurement(_Strict):
    value: Annotated[dict[TentaKey, float], Field(min_length=1)]
    timestamp: TentaTimestamp
    revision: TentaRevision | None = None


class TentaLog(_Strict):
    # Tenta cuts longer messages; Ivy promises never to be cut, so the checker
    # is stricter than the server here
    message: Annotated[str, Field(max_length=16_384)]
    severity: Literal["info", "warning", "error"]
    timestamp: TentaTimestamp
    revision: TentaRevision | None = None


TENTA_VALIDATORS: dict[str, pydantic.TypeAdapter[Any]] = {
    "acknowledgments": pydantic.TypeAdapter(
        Annotated[list[TentaAcknowledgment], Field(min_length=1)]
    ),
    "measurements": pydantic.TypeAdapter(Annotated[list[TentaMeasurement], Field(min_length=1)]),
    "logs": pydantic.TypeAdapter(Annotated[list[TentaLog], Field(min_length=1)]),
}

# --- ThingsBoard ----------------------------------------------------------------

THINGSBOARD_MAX_PACKET_BYTES = 65_536
_LONG_RANGE = (-(2**63), 2**63 - 1)


def _thingsboard_value(value: Any) -> Any:
    """JsonConverter: strings, booleans, numbers (an integer beyond a Java long
    fails: "Big integer values are not supported!"), objects and arrays (as
    JSON); null is skipped by current versions."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not _LONG_RANGE[0] <= value <= _LONG_RANGE[1]:
            raise ValueError(f"big integer {value} is not supported")
    elif not (value is None or isinstance(value, (bool, float, str, dict, list))):
        raise ValueError(f"cannot parse value {value!r}")
    return value


class ThingsBoardTelemetry(_Strict):
    ts: Annotated[int, Field(ge=0, le=_LONG_RANGE[1])]
    values: Annotated[
        dict[str, Annotated[Any, pydantic.AfterValidator(_thingsboard_value)]],
        Field(min_length=1),
    ]


THINGSBOARD_TELEMETRY = pydantic.TypeAdapter(
    Annotated[list[ThingsBoardTelemetry], Field(min_length=1)]
)


class ThingsBoardAttributeRequest(_Strict):
    sharedKeys: str  # ThingsBoard's own name


# --- the check ------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def packet_bytes(topic: str, payload: bytes) -> int:
    """The MQTT remaining length of a QoS 1 PUBLISH (without MQTT 5 properties):
    topic length field, topic, packet id, payload."""
    return 2 + len(topic.encode()) + 2 + len(payload)


def check_payload(topic: str, payload: bytes) -> None:
    """Raise ValueError when a real server would refuse this publish; topics
    that are neither Tenta's nor ThingsBoard's are not checked."""
    parts = topic.split("/")
    if parts[0] in TENTA_VALIDATORS and len(parts) == 2:
        if not re.match(TENTA_IDENTIFIER, parts[1]):
            raise ValueError(f"{topic}: Tenta's topic id must be the sensor's UUID")
        data = json.loads(payload, parse_constant=_no_constants)
        try:
            TENTA_VALIDATORS[parts[0]].validate_python(data)
        except pydantic.ValidationError as e:
            raise ValueError(f"Tenta would drop this {parts[0]} payload: {e}") from None
    elif topic == "v1/devices/me/telemetry":
        if packet_bytes(topic, payload) > THINGSBOARD_MAX_PACKET_BYTES:
            raise ValueError(f"ThingsBoard closes the connection: {len(payload)} bytes")
        data = json.loads(payload, parse_constant=_no_constants)
        try:
            THINGSBOARD_TELEMETRY.validate_python(data)
        except pydantic.ValidationError as e:
            raise ValueError(f"ThingsBoard cannot convert this telemetry: {e}") from None
    elif topic.startswith("v1/devices/me/attributes/request/"):
        ThingsBoardAttributeRequest.model_validate_json(payload)
    elif parts[0] == "ivy" and len(parts) == 3:
        _check_fleet_payload(parts[1], parts[2], payload)


# --- Ivy's fleet topics -------------------------------------------------------------

FLEET_REPORT_MAX_BYTES = 8_192  # far below any broker's packet limit


class FleetPresence(pydantic.BaseModel):
    """`ivy/<id>/presence` as `ivy fleet` reads it."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    online: bool
    at: Annotated[float, Field(gt=0, lt=2**33, allow_inf_nan=False)] | None = None


def _check_fleet_payload(station: str, kind: str, payload: bytes) -> None:
    from src.types.fleet import StationReport

    if kind == "state":
        if len(payload) > FLEET_REPORT_MAX_BYTES:
            raise ValueError(f"a state report of {len(payload)} bytes is not small and bounded")
        report = StationReport.model_validate_json(payload)
        if report.station != station:
            raise ValueError(f"the report on {station}'s topic names {report.station}")
    elif kind == "presence":
        FleetPresence.model_validate_json(payload)
    else:
        raise ValueError(f"ivy/{station}/{kind} is not a topic `ivy fleet` reads")
