"""Remote change of a station: configs and software versions, on trial, under
the station's trust policy. In the order the pieces build on each other:

- leaves: `paths` (where things live), `journal` (where an update stands, edited
  under a lock), `commands` (running a step's command, dying with the parent),
  `trust` (the local policy), `admission` (bounds, freshness, the pending queue);
- `signatures` (signed configs), `source` (fetching a verified release),
  `dependencies` (the locked install), `health` (when a change is healthy);
- `answers` (what the station says about a config), `steps` (the update's steps),
  `worker` (the process that runs them);
- `config_trial`, `version_trial` (the guard), and `coordinator`, which the main
  loop asks each turn and which answers with one action;
- `station_setup` (`ivy setup`).

The names below are what the main loop, run.py and the CLI use; they are
imported on first use (PEP 562), so that a process loads only what it needs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..lazy_exports import lazy_attribute

if TYPE_CHECKING:
    from .coordinator import HandOver, RestartWith, UpdateCoordinator
    from .source import remove_stale_staging
    from .station_setup import SetupError, set_up_station
    from .version_trial import (
        Guard,
        RollbackError,
        is_guarded,
        previous_version,
        request_rollback,
        resolve_at_start,
        roll_back_by_hand,
    )

_EXPORTS = {
    "HandOver": "coordinator",
    "RestartWith": "coordinator",
    "UpdateCoordinator": "coordinator",
    "remove_stale_staging": "source",
    "SetupError": "station_setup",
    "set_up_station": "station_setup",
    "Guard": "version_trial",
    "RollbackError": "version_trial",
    "is_guarded": "version_trial",
    "previous_version": "version_trial",
    "request_rollback": "version_trial",
    "resolve_at_start": "version_trial",
    "roll_back_by_hand": "version_trial",
}

__all__ = [
    "Guard",
    "HandOver",
    "RestartWith",
    "RollbackError",
    "SetupError",
    "UpdateCoordinator",
    "is_guarded",
    "previous_version",
    "remove_stale_staging",
    "request_rollback",
    "resolve_at_start",
    "roll_back_by_hand",
    "set_up_station",
]


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name)
