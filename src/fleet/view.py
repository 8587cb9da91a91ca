"""One station as the fleet sees it: healthy, unhealthy, unreachable (its
last will said offline, or no report for a set time) or unknown (never
heard of), from what the broker holds; and the summary of them all."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Literal

from .broker import Sightings

# a station that reports every few minutes and has not for this long is away
DEFAULT_UNREACHABLE_AFTER_SECONDS = 900.0

Condition = Literal["healthy", "unhealthy", "unreachable", "unknown"]


@dataclass(frozen=True)
class StationView:
    """What `ivy fleet status` shows of one station."""

    station: str
    condition: Condition
    since: float | None  # unreachable since (the last word from it)
    sightings: Sightings


def last_heard(sightings: Sightings) -> float | None:
    """When the station last said anything (by its own clock where it says)."""
    moments = [
        t
        for t in (
            sightings.report.reported_at if sightings.report else None,
            sightings.presence_at if sightings.online else None,
        )
        if t is not None
    ]
    return max(moments) if moments else None


def is_reachable(
    sightings: Sightings,
    unreachable_after: float = DEFAULT_UNREACHABLE_AFTER_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether the station is online as far as the broker knows: its presence
    is not offline and it reported within `unreachable_after` seconds."""
    if sightings.online is False or sightings.report is None:
        return False
    heard = last_heard(sightings)
    return heard is not None and (now or time.time()) - heard <= unreachable_after


def view(
    station: str,
    sightings: Sightings,
    unreachable_after: float = DEFAULT_UNREACHABLE_AFTER_SECONDS,
    now: float | None = None,
) -> StationView:
    """Classify one station."""
    if sightings.report is None and sightings.online is None:
        return StationView(station, "unknown", None, sightings)
    if not is_reachable(sightings, unreachable_after, now):
        return StationView(station, "unreachable", last_heard(sightings), sightings)
    assert sightings.report is not None
    condition: Condition = "healthy" if sightings.report.healthy else "unhealthy"
    return StationView(station, condition, None, sightings)


def summary(views: list[StationView]) -> dict[str, object]:
    """Counts by condition, version and config revision."""
    return {
        "stations": len(views),
        "conditions": dict(collections.Counter(v.condition for v in views)),
        "versions": dict(
            collections.Counter(v.sightings.report.version for v in views if v.sightings.report)
        ),
        "revisions": {
            str(k): n
            for k, n in collections.Counter(
                v.sightings.report.config_revision for v in views if v.sightings.report
            ).items()
        },
    }
