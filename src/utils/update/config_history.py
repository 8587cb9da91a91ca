"""The configs a station ran before its last few accepted ones, so that a
signed `revert` (what `ivy fleet rollback` sends) can bring one back without
anyone sending the station's secrets over the broker again:
`config/history/before-<revision>.json` is the config that ran before
revision `<revision>` was accepted (secrets included, mode 0600, like the
config itself). The newest few are kept."""

from __future__ import annotations

import json
import os
from typing import Any

from src import constants
from src.types.atomic_file import write_atomically

from .journal import load_journal
from .paths import previous_config_path

KEPT = 5


def history_directory() -> str:
    """`config/history` beside the running config."""
    return os.path.join(os.path.dirname(constants.CONFIG_PATH), "history")


def _path_before(revision: int) -> str:
    return os.path.join(history_directory(), f"before-{revision}.json")


def keep_previous(previous_path: str, revision: int) -> None:
    """Keep the config at `previous_path` as the one that ran before
    `revision` (which was just accepted); forget all but the newest few.
    Called when a config trial ends in acceptance."""
    if not os.path.isfile(previous_path):
        return
    directory = history_directory()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(previous_path, encoding="utf-8") as f:
        write_atomically(_path_before(revision), f.read())  # 0600: secrets included
    kept = sorted(
        (os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".json")),
        key=os.path.getmtime,
    )
    for old in kept[:-KEPT]:
        os.remove(old)


def config_before(revision: int) -> dict[str, Any] | None:
    """The raw config that ran before `revision` was accepted (or before it
    was put on the trial that is still running), or None when this station
    keeps none for it."""
    path = _path_before(revision)
    trial = load_journal().config_trial
    if not os.path.isfile(path) and trial is not None and trial.config_revision == revision:
        path = previous_config_path()
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None
