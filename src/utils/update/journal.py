"""The update journal, `<data>/update-journal.json`: which version the station
runs, which one it ran before (the one to go back to), and a candidate version
while the station is switching to it. Written atomically (temporary file,
fsync, rename), so that a power loss at any moment leaves the old or the new
journal, and any start of any version can tell where an update stood.
The data directory is shared by all versions, so every version reads the same
journal; unknown keys (a newer version's) are kept.
Read and written by the main loop and its updater, and by `ivy setup`."""

from __future__ import annotations

import json
import os
from typing import Literal

import pydantic

from src import constants
from src.types.atomic_file import write_atomically


class Candidate(pydantic.BaseModel):
    """A version on trial: started by the guard of `from_version`, judged,
    then committed (the pointer moves to it) or rolled back (the pointer
    stays). `phase` moves trial -> committed or rolling_back before the
    pointer is touched, so a start after a power loss can finish the step."""

    model_config = pydantic.ConfigDict(extra="allow")
    version: str
    from_version: str
    config_revision: int
    switched_at: float
    phase: Literal["trial", "committed", "rolling_back"] = "trial"
    attempts: int = 0
    deadline_seconds: float = 300
    stable_seconds: float = 30
    max_starts: int = 3
    problem: str | None = None
    rollback_requested: bool = False


class PendingAnswer(pydantic.BaseModel):
    """The answer about a version update that the version running after it
    gives (accepted by the new one after a commit, rejected by the old one
    after a rollback)."""

    model_config = pydantic.ConfigDict(extra="allow")
    config_revision: int
    software_version: str
    status: Literal["accepted", "rejected"]
    reason: str | None = None


class ConfigTrialRecord(pydantic.BaseModel):
    """A config of the running version on trial (`config/config.previous.json`
    holds the one before it)."""

    model_config = pydantic.ConfigDict(extra="allow")
    config_revision: int
    started_at: float


class UpdateJournal(pydantic.BaseModel):
    """Where updates stand; what `ivy update status` shows."""

    model_config = pydantic.ConfigDict(extra="allow")
    current: str | None = None
    previous: str | None = None
    candidate: Candidate | None = None
    config_trial: ConfigTrialRecord | None = None
    pending_answer: PendingAnswer | None = None
    # versions rolled back: a config asking for one again is refused
    bad_versions: list[str] = pydantic.Field(default_factory=list)
    last_outcome: str | None = None


def journal_path() -> str:
    """`<data>/update-journal.json`."""
    return os.path.join(constants.DATA_DIR, "update-journal.json")


def load_journal() -> UpdateJournal:
    """The journal; an empty one when there is none or it cannot be read (a
    station set up before the journal existed)."""
    try:
        with open(journal_path(), encoding="utf-8") as f:
            return UpdateJournal.model_validate(json.load(f))
    except (OSError, ValueError):
        return UpdateJournal()


def save_journal(journal: UpdateJournal) -> None:
    """Replace the journal atomically."""
    write_atomically(journal_path(), journal.model_dump_json(indent=2) + "\n", mode=0o644)
