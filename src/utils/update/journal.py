"""The update journal, `<data>/update-journal.json`: which version the station
runs, which one it ran before (the one to go back to), and a candidate version
while the station is switching to it. Written atomically (temporary file,
fsync, rename), so that a power loss at any moment leaves the old or the new
journal, and any start of any version can tell where an update stood.

Three processes change it (the main loop, a trial's guard, `ivy rollback`), so
every change is an `edit_journal()`: the file lock is held from the read to the
write, and nobody writes back a copy read earlier (a guard that saved its own
copy once overwrote an `ivy rollback` request made a moment before).

The data directory is shared by all versions, so every version reads the same
journal; unknown keys (a newer version's) are kept."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Literal

import pydantic

from src.types.atomic_file import write_atomically

from ..file_lock import file_lock
from .paths import journal_lock_path, journal_path

_LOCK_TIMEOUT_SECONDS = 30

CandidatePhase = Literal["trial", "committed", "rolling_back"]
# every move a candidate may make, in one place: a trial ends committed or
# rolling back, and either is finished by whoever starts next
_PHASE_MOVES: dict[CandidatePhase, frozenset[CandidatePhase]] = {
    "trial": frozenset({"committed", "rolling_back"}),
    "committed": frozenset(),
    "rolling_back": frozenset(),
}


class JournalError(Exception):
    """A change of the journal that its rules do not allow (a bug, not input)."""


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
    phase: CandidatePhase = "trial"
    attempts: int = 0
    deadline_seconds: float = 300
    stable_seconds: float = 30
    max_starts: int = 3
    problem: str | None = None
    rollback_requested: bool = False

    def move_to(self, phase: CandidatePhase) -> None:
        """Change the phase, or raise `JournalError` when the move is not one
        of `_PHASE_MOVES`."""
        if phase not in _PHASE_MOVES[self.phase]:
            raise JournalError(f"a candidate cannot move from {self.phase} to {phase}")
        self.phase = phase


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


def _read() -> UpdateJournal:
    try:
        with open(journal_path(), encoding="utf-8") as f:
            return UpdateJournal.model_validate(json.load(f))
    except (OSError, ValueError):
        return UpdateJournal()


def load_journal() -> UpdateJournal:
    """The journal as it is now, to read (never to write back: change it with
    `edit_journal`); an empty one when there is none or it cannot be read (a
    station set up before the journal existed)."""
    return _read()


@contextlib.contextmanager
def edit_journal() -> Iterator[UpdateJournal]:
    """`with edit_journal() as journal: journal.x = ...`: read, change and
    replace the journal atomically while holding its lock, so that changes of
    other processes in between are never lost. Nothing is written when the
    block raises."""
    os.makedirs(os.path.dirname(journal_lock_path()), exist_ok=True)
    with file_lock(journal_lock_path(), timeout=_LOCK_TIMEOUT_SECONDS):
        journal = _read()
        yield journal
        write_atomically(journal_path(), journal.model_dump_json(indent=2) + "\n", mode=0o644)


def save_journal(journal: UpdateJournal) -> None:
    """Replace the whole journal with `journal`, under the lock. For a process
    that owns it outright (tests, a journal made from scratch); everyone else
    edits (`edit_journal`)."""
    os.makedirs(os.path.dirname(journal_lock_path()), exist_ok=True)
    with file_lock(journal_lock_path(), timeout=_LOCK_TIMEOUT_SECONDS):
        write_atomically(journal_path(), journal.model_dump_json(indent=2) + "\n", mode=0o644)
