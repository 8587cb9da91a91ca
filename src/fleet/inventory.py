"""The fleet's inventory: the broker to reach the stations through and the
stations, each with optional groups (site, uplink), read from a JSON or TOML
file with the same keys:

    {"broker": {<the connection fields of a backend section>},
     "stations": [{"id": "<system_identifier>", "groups": ["site-a"]}, ...]}
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pydantic
from pydantic import Field

from src.types.config import BrokerConnection, format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (a dependency there only)
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

_STATION_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class InventoryError(Exception):
    """The inventory cannot be used; the message names the file and field."""


class StationEntry(pydantic.BaseModel):
    """One station of the fleet."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    id: str = Field(..., pattern=_STATION_PATTERN)
    groups: list[str] = Field(default_factory=list, max_length=32)


class Inventory(pydantic.BaseModel):
    """The broker and the stations."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    broker: BrokerConnection
    stations: list[StationEntry] = Field(..., min_length=1, max_length=100_000)

    @pydantic.field_validator("stations")
    @classmethod
    def _unique(cls, stations: list[StationEntry]) -> list[StationEntry]:
        seen: set[str] = set()
        for station in stations:
            if station.id in seen:
                raise ValueError(f"station {station.id!r} is listed twice")
            seen.add(station.id)
        return stations

    def ids(self) -> list[str]:
        """Every station's id, in the inventory's order."""
        return [station.id for station in self.stations]


def load_inventory(path: str) -> Inventory:
    """Read and validate the inventory at `path` (`.toml`: TOML, else JSON);
    raise `InventoryError` naming the file and the field."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise InventoryError(f"{path}: cannot be read ({e.strerror})") from None
    raw: Any
    try:
        if path.endswith(".toml"):
            raw = tomllib.loads(content.decode("utf-8"))
        else:
            raw = json.loads(content)
    except (ValueError, UnicodeDecodeError) as e:
        raise InventoryError(
            f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}"
        ) from None
    try:
        return Inventory.model_validate(raw)
    except pydantic.ValidationError as e:
        raise InventoryError(format_validation_error(e, f"inventory {path}")) from None
