"""The updater the main loop asks once per turn: it works through the pending
configs, runs the update worker and judges config trials, and answers with one
action for the main loop to carry out:

- `RestartWith(config)`: restart the children with this config (a new config
  on trial, or the previous one back after a failed trial);
- `HandOver(version)`: every step of an update passed; stop and let run.py
  become the version's guard;
- None: nothing to do.

Configs that arrive during an update or a trial wait in the state. Each
config is judged by the trust policy's rules for remote changes (local
`ivy config apply` is trusted), then as a config of this version (on trial)
or as a version change (checked, then installed by the worker)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import pydantic

from src import constants
from src.types import Config, ForeignConfig
from src.types.config import format_validation_error
from src.types.state import PendingConfig

from ..logger import Logger
from ..merge_patch import merge_patch
from ..messaging_agent import MessagingAgent
from ..state_interface import StateInterface
from . import config_trial
from .admission import is_new, mark_handled, put_back, take_pending_configs
from .answers import Answers
from .config_trial import ConfigTrial
from .journal import load_journal
from .paths import runs_from_production_root, version_directory
from .trust import TrustError, load_policy, remote_config_problem
from .version_trial import deliver_pending_answer, is_guarded, start_trial
from .worker import UpdateJob, forget_interrupted_update


@dataclass(frozen=True)
class RestartWith:
    """The main loop restarts its children with `config`."""

    config: Config


@dataclass(frozen=True)
class HandOver:
    """The main loop stops and hands over to `version`'s trial."""

    version: str


Action = RestartWith | HandOver | None


class UpdateCoordinator:
    """All remote change of one main loop run."""

    def __init__(self, config: Config, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Judge configs against the running `config`."""
        self.config = config
        self.answers = Answers(logger, messaging_agent)
        self.job: UpdateJob | None = None
        self.trial: ConfigTrial | None = None
        self.restarting: ConfigTrial | None = None
        self.handing_over = False
        self.state_seen: tuple[int, int] | None = None

    def use(self, config: Config, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Judge against `config` from now on (after the main loop reconfigured)."""
        self.config = config
        self.answers = Answers(logger, messaging_agent)

    def at_start(self) -> None:
        """When the main loop starts: forget an update its predecessor did not
        finish, send the answer a version trial left (unless this is the
        candidate on trial), and resume an interrupted config trial."""
        forget_interrupted_update(self.answers.logger)
        if not is_guarded():  # a candidate does not answer for itself
            deliver_pending_answer(self.answers.logger, self.answers.messaging_agent)
        self.trial = config_trial.interrupted_trial(self.config)
        if self.trial is not None:
            self.answers.logger.info("resuming the trial of the config this station was trying")
            self.trial.watch(self.config)

    def children_stopped(self) -> None:
        """Called by the main loop between stopping the children and starting
        them with a new config: the trial of that config starts watching."""
        if self.restarting is not None:
            self.trial = self.restarting
            self.restarting = None
            self.trial.watch(self.config)

    def on_trial(self) -> bool:
        """Whether a change is on trial: a config (or about to be, its
        children starting), or this whole version (a candidate's main loop,
        judged by its guard, which may still roll it back)."""
        return self.trial is not None or self.restarting is not None or is_guarded()

    def sentinels(self) -> list[int]:
        """What the main loop waits on besides its children (the worker)."""
        return [self.job.sentinel()] if self.job is not None else []

    def cancel(self) -> None:
        """Stop an update in progress (the main loop is stopping)."""
        if self.job is not None:
            self.answers.logger.warning(
                "stopping during an update: cancelled it; the config is tried again "
                "when it next arrives"
            )
            self.job.cancel()
            self.job = None

    def next_action(self) -> Action:
        """The one thing the main loop should do now (see the module)."""
        if self.handing_over:
            return None
        if self.job is not None:
            return self._poll_update()
        if self.trial is not None:
            return self._judge_trial()
        return self._take_pending()

    # --- the update worker --------------------------------------------------

    def _poll_update(self) -> Action:
        assert self.job is not None
        outcome = self.job.outcome()
        if not outcome.finished:
            return None
        pending = self.job.pending
        self.job = None
        self.state_seen = None  # look at configs that waited
        if outcome.failure is not None:
            self._abandon_update(pending, outcome.failure)
            return None
        start_trial(pending.config)
        mark_handled(pending, accepted=True)
        self.answers.acknowledge(pending, "progress", step="switch", software_update="UPDATING")
        version = pending.config.general.software_version.root
        self.answers.logger.info(f"version {version} goes on trial; handing over to its guard")
        self.handing_over = True
        return HandOver(version)

    def _abandon_update(self, pending: PendingConfig, reason: str) -> None:
        """Reject the config with the failed step's reason and remove what
        the update added under the root (never the running version, nor the
        previous one a rollback needs)."""
        version = pending.config.general.software_version.root
        directory = version_directory(version)
        keep = {os.path.realpath(constants.PROJECT_DIR)}
        previous = load_journal().previous
        if previous is not None:
            keep.add(os.path.realpath(version_directory(previous)))
        if os.path.realpath(directory) not in keep:
            shutil.rmtree(directory, ignore_errors=True)
        self.answers.reject(pending, f"the update to {version} failed at {reason}")

    # --- config trials -----------------------------------------------------

    def _judge_trial(self) -> Action:
        assert self.trial is not None
        decided, problem = self.trial.verdict()
        if not decided:
            return None
        pending = self.trial.pending
        self.trial = None
        self.state_seen = None
        if problem is None:
            config_trial.accept(pending, self.answers)
            return None
        return RestartWith(config_trial.reject(pending, problem, self.answers))

    # --- pending configs ---------------------------------------------------

    def _state_changed(self) -> bool:
        # a backend that queues a config replaces the state file (new inode):
        # skip the locked read and parse while it has not changed. The main
        # loop's heartbeat rewrites it every 10 s, so even a change within one
        # clock tick is seen soon.
        try:
            stat = os.stat(constants.STATE_PATH)
        except FileNotFoundError:
            return False
        version = (stat.st_ino, stat.st_mtime_ns)
        if version == self.state_seen:
            return False
        self.state_seen = version
        return True

    def _take_pending(self) -> Action:
        if not self._state_changed():
            return None
        pending = take_pending_configs()
        for index, candidate in enumerate(pending):
            action = self._judge(candidate)
            if action is not None or self.job is not None:
                put_back(pending[index + 1 :])
                self.state_seen = None
                return action
        return None

    def _judge(self, pending: PendingConfig) -> Action:
        revision = pending.config.general.config_revision
        if not is_new(pending, self.config.general.config_revision, StateInterface.load()):
            self.answers.logger.info(f"ignoring config revision {revision}: handled already")
            return None
        if pending.patch is not None:
            rebased = self._rebased(pending)
            if rebased is None:
                return None
            pending = rebased
        if pending.origin == "remote":
            problem = self._policy_problem(pending)
            if problem is not None:
                self.answers.acknowledge(pending, "received")
                self.answers.reject(pending, problem)
                return None
        if pending.config.general.software_version.root != constants.VERSION.root:
            self._judge_version_change(pending)
            return None
        new_config = config_trial.apply_on_trial(pending, self.config, self.answers)
        if new_config is None:
            return None
        self.restarting = ConfigTrial(pending, new_config.trial)
        return RestartWith(new_config)

    def _rebased(self, pending: PendingConfig) -> PendingConfig | None:
        """A patch merged into the config running now (not the one running
        when it arrived: a patch queued behind another builds on it, and one
        that waited for a trial that was rolled back does not carry that
        trial's change); None, and the patch rejected, when the result is not
        a config."""
        assert pending.patch is not None
        running = json.loads(self.config.to_json(reveal_secrets=True))
        merged = merge_patch(running, pending.patch)
        if isinstance(merged, dict) and isinstance(merged.get("general"), dict):
            merged["general"]["config_revision"] = pending.config.general.config_revision
        try:
            config = ForeignConfig.model_validate(merged)
        except pydantic.ValidationError as e:
            self.answers.acknowledge(pending, "received")
            self.answers.reject(pending, format_validation_error(e, "the patched config"))
            return None
        return pending.model_copy(update={"config": config})

    def _policy_problem(self, pending: PendingConfig) -> str | None:
        try:
            policy = load_policy()
        except TrustError as e:
            return str(e)
        if policy is None:
            return "this station has no trust policy: it takes no remote config"
        running = json.loads(self.config.to_json(reveal_secrets=True))
        return remote_config_problem(policy, running, pending.config.to_dict())

    def _judge_version_change(self, pending: PendingConfig) -> None:
        """Start the update worker for a config that asks for another version,
        or reject it with the reason it cannot be installed."""
        version = pending.config.general.software_version
        self.answers.acknowledge(pending, "received", software_update="DOWNLOADING")
        problem = self.version_change_problem(pending)
        if problem is not None:
            self.answers.reject(pending, problem)
            return
        self.answers.logger.info(
            f"config revision {pending.config.general.config_revision} asks for version "
            f"{version.root}: updating (procedures keep measuring meanwhile)"
        )
        self.job = UpdateJob.start(self.config, pending)

    def version_change_problem(self, pending: PendingConfig) -> str | None:
        """Why a config asking for another version cannot be installed here
        (None: it can): no pinned source or another one named, not a production
        root, a version rolled back before, a downgrade nobody allowed."""
        version = pending.config.general.software_version
        try:
            policy = load_policy()
        except TrustError as e:
            return str(e)
        if policy is None or policy.release_source is None:
            return (
                "general.software_version: this station's trust policy pins no release source, "
                "so it takes no other version (set one on the station with `ivy trust set`)"
            )
        updater = pending.config.to_dict().get("updater")
        if updater is not None and not policy.release_source.named_by(updater):
            return (
                "updater: names a release source other than the one this station's trust "
                f"policy pins ({policy.release_source.source} {policy.release_source.repository});"
                " versions come only from that one (change it with `ivy trust set`)"
            )
        if not runs_from_production_root() and not os.environ.get("IVY_DATA_DIR"):
            # the new version would live under the root with a data directory
            # of its own, and this queue would be left behind
            return (
                f"general.software_version: this installation ({constants.PROJECT_DIR}) is not "
                f"a version directory under the root {constants.ROOT_DIR}, so another version "
                "would not share its queue; install with `ivy setup` to update remotely"
            )
        if version.root in load_journal().bad_versions:
            return (
                f"general.software_version: {version.root} was rolled back on this station "
                "before; release a fixed version under a new number"
            )
        if version < constants.VERSION:
            asked = isinstance(updater, dict) and updater.get("allow_downgrades") is True
            allowed = pending.origin == "local" or policy.allow_downgrades
            if not (asked and allowed):
                return (
                    f"general.software_version: {version.root} is older than the running "
                    f"{constants.VERSION.root}; a downgrade needs updater.allow_downgrades"
                    + ("" if allowed else " and a trust policy that allows downgrades")
                )
        return None
