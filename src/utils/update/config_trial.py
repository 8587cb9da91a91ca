"""A config for the running version, on trial: validated against the full
schema, written atomically to `config/config.json` (the running one kept as
`config/config.previous.json`), and judged by the health definition once the
children run with it. Healthy in time: accepted, the previous one forgotten.
Fatally broken or not healthy by its deadline: the previous config is back and
the new one is rejected with the reason. A trial that a restart interrupted
starts over (a power loss is not the config's fault). Used by the updater."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from src.types import Config, ConfigError
from src.types.config import TrialConfig
from src.types.state import PendingConfig

from ..state_interface import StateInterface
from .admission import mark_handled
from .answers import Answers, record_config_outcome
from .config_history import keep_previous
from .health import HealthWatch, fatal_problem
from .journal import ConfigTrialRecord, edit_journal, load_journal
from .paths import previous_config_path


def _end_trial_record() -> None:
    with edit_journal() as journal:
        journal.config_trial = None
    try:
        os.remove(previous_config_path())
    except FileNotFoundError:
        pass


@dataclass
class ConfigTrial:
    """A config of this version applied and not yet proven healthy."""

    pending: PendingConfig
    settings: TrialConfig
    health: HealthWatch | None = None
    # the deadline runs on the monotonic clock, so that a wall clock stepped
    # ahead does not end a trial early (or stepped back, late)
    started_monotonic: float = 0.0

    def watch(self, config: Config) -> None:
        """Start judging: called once the old children are stopped and before
        the new ones start, so that their reports can be told from their
        predecessors'."""
        self.health = HealthWatch(
            StateInterface.load(), self.settings.stable_seconds, list(config.destinations())
        )
        self.started_monotonic = time.monotonic()

    def verdict(self) -> tuple[bool, str | None]:
        """(decided, problem): not decided while the config may still become
        healthy; decided with None when healthy, with the reason when not."""
        if self.health is None:
            return False, None
        state = StateInterface.load()
        problem = self.health.problem(state)
        if problem is None:
            return True, None
        fatal = fatal_problem(state)
        deadline = self.settings.deadline_seconds
        if fatal is None and time.monotonic() - self.started_monotonic < deadline:
            return False, None
        return True, fatal or f"not healthy {deadline} s after the change: {problem}"


def apply_on_trial(pending: PendingConfig, running: Config, answers: Answers) -> Config | None:
    """Validate a config for this version and apply it on trial: write it
    (keeping the running one aside), remember it as handled and return it;
    None when it is invalid (then it is rejected and nothing is written)."""
    revision = pending.config.general.config_revision
    answers.acknowledge(pending, "received")
    try:
        new_config = Config.load_from_string(
            json.dumps(pending.config.to_dict()), source=f"config revision {revision}"
        )
    except ConfigError as e:
        answers.reject(pending, str(e))
        return None
    if new_config.migration_notice:
        answers.logger.info(f"config revision {revision}: {new_config.migration_notice}")
    # the running config stays at hand until the new one has proven itself
    running.dump(previous_config_path())
    with edit_journal() as journal:
        journal.config_trial = ConfigTrialRecord(config_revision=revision, started_at=time.time())
    new_config.dump()
    mark_handled(pending, accepted=True)
    answers.logger.info(
        f"applying config revision {revision} on trial; restarting procedures and backend"
    )
    return new_config


def accept(pending: PendingConfig, answers: Answers) -> None:
    """The config proved healthy: acknowledge it and forget the previous one."""
    revision = pending.config.general.config_revision
    answers.acknowledge(pending, "accepted")
    record_config_outcome(revision, pending.config.general.software_version.root, "accepted")
    keep_previous(previous_config_path(), revision)
    _end_trial_record()
    answers.logger.info(f"accepted config revision {revision}: healthy")


def reject(pending: PendingConfig, problem: str, answers: Answers) -> Config:
    """The config did not prove healthy: put the previous config back, reject
    this one with the reason and return the previous one."""
    previous = Config.load(previous_config_path())
    previous.dump()
    _end_trial_record()
    answers.reject(pending, f"the previous config is back: {problem}")
    return previous


def interrupted_trial(running: Config) -> ConfigTrial | None:
    """The trial a restart interrupted, to start over with the running
    config; None when there was none (a stale record is dropped)."""
    if load_journal().config_trial is None:
        return None
    if not os.path.isfile(previous_config_path()):
        with edit_journal() as journal:
            journal.config_trial = None
        return None
    return ConfigTrial(
        PendingConfig(config=running.to_foreign_config(), origin="local"), running.trial
    )
