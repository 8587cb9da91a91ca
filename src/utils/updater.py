"""Apply configs that arrived from the backend or from `ivy config apply`
(queued in `state.pending_configs`).

A config for the running software version is validated against the full schema,
written atomically to `config/config.json`, and handed back to the main loop,
which restarts its children with it. A config for another version starts a
software update in a worker process (`update_worker`): check the disk, fetch
the source of tag `v<version>`, install its locked dependencies into its own
venv, write and check the config with the new version's own schema, and run
its `version_change` tests. When all pass, the main loop switches the CLI
pointer and hands over to the new version (`switch_to`). Every outcome and
every step is acknowledged through the message queue; a refusal leaves the
running version untouched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import pydantic
import tum_esm_utils.validators

from src import constants
from src.types import (
    Config,
    ConfigError,
    ConfigMessageBody,
    ForeignConfig,
    State,
    UpdaterConfig,
)
from src.types.atomic_file import write_atomically
from src.types.config import format_validation_error, secret_values
from src.types.messages import SoftwareUpdateState
from src.types.state import ConfigOutcome

from .logger import Logger
from .messaging_agent import MessagingAgent
from .state_interface import StateInterface
from .update.commands import StepError, mask, run_command
from .update.dependencies import install_locked_dependencies
from .update.journal import Candidate, ConfigTrialRecord, load_journal, save_journal
from .update.source import download_source_code, version_directory

_REJECTED_REVISIONS_KEPT = 32
_OUTCOMES_KEPT = 16
PYTEST_MARKER = "version_change"
INSTALL_TIMEOUT_SECONDS = 900.0
TESTS_TIMEOUT_SECONDS = 900.0
CONFIG_CHECK_TIMEOUT_SECONDS = 60.0
# free space asked for beyond the estimated size of the new version
DISK_MARGIN_BYTES = 100 * 1024 * 1024


def cli_pointer_path() -> str:
    """`<root>/ivy-cli.sh`, the CLI of the version the station runs."""
    return os.path.join(constants.ROOT_DIR, f"{constants.NAME}-cli.sh")


def config_revision_is_new(revision: int, current_revision: int, state: State) -> bool:
    """Whether a remote config with this revision is to be judged: at least the
    running revision, higher than the last accepted one (a station that has
    accepted none takes its current revision, e.g. Tenta's first, 0), and not
    rejected already. Called by the backends on arrival and by the updater."""
    handled = state.highest_handled_config_revision
    return (
        revision >= current_revision
        and (handled is None or revision > handled)
        and revision not in state.rejected_config_revisions
    )


def mark_config_revision_handled(revision: int) -> None:
    """Remember that a revision was accepted, so that a retained copy arriving
    again after a reconnect is ignored. Called by the updater."""
    with StateInterface.update() as state:
        state.highest_handled_config_revision = max(
            revision, state.highest_handled_config_revision or revision
        )


def mark_config_revision_rejected(revision: int) -> None:
    """Remember that a revision was rejected, so that it is not answered again
    at every reconnect; only this revision is blocked, never later ones.
    Called by the updater and by backends that reject a config on arrival."""
    with StateInterface.update() as state:
        if revision not in state.rejected_config_revisions:
            state.rejected_config_revisions = [
                *state.rejected_config_revisions[-(_REJECTED_REVISIONS_KEPT - 1) :],
                revision,
            ]


def check_config_with_version(project: str, path: str, secrets: Iterable[str]) -> None:
    """Have the CLI of the version in `project` (in its own venv) check the
    config at `path` against that version's own schema; raise `StepError`
    with the problems it names, secrets masked. Called by the update worker
    and by `ivy setup`."""
    run_command(
        [
            os.path.join(project, ".venv", "bin", "python"),
            os.path.join(project, "cli.py"),
            "config",
            "check",
            path,
        ],
        timeout=CONFIG_CHECK_TIMEOUT_SECONDS,
        cwd=project,
        secrets=secrets,
    )


def previous_config_path() -> str:
    """Where the config that ran before a config on trial waits
    (`config/config.previous.json`)."""
    return os.path.join(os.path.dirname(constants.CONFIG_PATH), "config.previous.json")


def _end_config_trial() -> None:
    journal = load_journal()
    journal.config_trial = None
    save_journal(journal)
    try:
        os.remove(previous_config_path())
    except FileNotFoundError:
        pass


def record_config_outcome(
    revision: int, version: str, status: str, reason: str | None = None
) -> None:
    """Remember how a config ended, for `ivy config apply` and `ivy status`
    (the last few only). Called by the updater."""
    outcome = ConfigOutcome(
        config_revision=revision,
        software_version=version,
        status=status,
        reason=reason,
        at=time.time(),
    )
    with StateInterface.update() as state:
        state.config_outcomes = [*state.config_outcomes[-(_OUTCOMES_KEPT - 1) :], outcome]


@dataclass(frozen=True)
class Reconfigure:
    """The main loop restarts its children with `config`."""

    config: Config


@dataclass(frozen=True)
class StartUpdate:
    """The main loop starts an update worker for this config and version."""

    foreign_config: ForeignConfig
    updater_config: UpdaterConfig


Decision = Reconfigure | StartUpdate | None


def _directory_bytes(path: str) -> int:
    """Disk used below `path`, each inode once (hardlinked venvs share files)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


_MAX_PENDING_CONFIGS = 16
# larger configs are rejected unparsed (the backend's and `ivy config apply`'s bound)
MAX_CONFIG_BYTES = 256 * 1024


def queue_pending_config(foreign_config: ForeignConfig) -> bool:
    """Put a config in `state.pending_configs` for the main loop's updater,
    unless a config with that revision waits already; return whether it was
    queued. At most the newest 16 wait (a flood cannot grow the state file).
    Called by the backends on arrival and by `ivy config apply`."""
    revision = foreign_config.general.config_revision
    with StateInterface.update() as state:
        if any(p.general.config_revision == revision for p in state.pending_configs):
            return False
        state.pending_configs = [
            *state.pending_configs[-(_MAX_PENDING_CONFIGS - 1) :],
            foreign_config,
        ]
    return True


class Updater:
    """Decides about pending configs and runs the steps of a software update.
    Used by the main loop (decisions, switch) and its update worker (steps)."""

    def __init__(
        self,
        config: Config,
        logger: Logger | None = None,
        messaging_agent: MessagingAgent | None = None,
    ) -> None:
        """Prepare to judge configs against the running `config`."""
        self.config = config
        self.logger = logger or Logger(config, "updater")
        self.messaging_agent = messaging_agent or MessagingAgent(config)

    # --- the steps, each usable on its own --------------------------------

    @staticmethod
    def check_free_space(version: tum_esm_utils.validators.Version) -> None:
        """Refuse (`StepError`) when the root's filesystem has less free space
        than this installation takes (source and venv) plus a margin: the new
        version would be about as large."""
        os.makedirs(constants.ROOT_DIR, exist_ok=True)
        needed = _directory_bytes(constants.PROJECT_DIR) + DISK_MARGIN_BYTES
        free = shutil.disk_usage(constants.ROOT_DIR).free
        if free < needed:
            raise StepError(
                f"not enough disk space for version {version.root}: {free // 2**20} MiB free "
                f"in {constants.ROOT_DIR}, about {needed // 2**20} MiB needed"
            )

    @staticmethod
    def download_source_code(
        updater_config: UpdaterConfig,
        version: tum_esm_utils.validators.Version,
        log_progress: Callable[[str], None],
    ) -> None:
        """Fetch the source of tag `v<version>` into `<root>/<version>/` (see
        `source_download`: staging, safe extraction, token in a header only).
        Raise `DownloadError` with the reason when it cannot."""
        download_source_code(updater_config, version.root, log_progress)

    @staticmethod
    def install_dependencies(
        version: tum_esm_utils.validators.Version,
        log_progress: Callable[[str], None],
        installation_command: str | None = None,
    ) -> None:
        """Create `<root>/<version>/.venv` with exactly the locked runtime and
        `gate` dependencies of that version's `pdm.lock` (see
        `dependency_install`). Raise `StepError` with the tail of the output.
        `installation_command` (the reference API's) replaces that with a
        command of the caller's, split into arguments and run in the version
        directory without a shell; the updater never passes one."""
        project = version_directory(version.root)
        if installation_command is None:
            install_locked_dependencies(project, log_progress, INSTALL_TIMEOUT_SECONDS)
            return
        log_progress(f"running {installation_command!r} in {project}")
        run_command(shlex.split(installation_command), timeout=INSTALL_TIMEOUT_SECONDS, cwd=project)

    @staticmethod
    def run_pytests(version: tum_esm_utils.validators.Version, pytest_marker: str) -> None:
        """Run `pytest -m <pytest_marker>` of `<root>/<version>/` in its own
        venv, with data and root directories of its own (removed afterwards),
        so that the tests can never touch the running station's queue, state
        or config. Raise `StepError` with the tail of pytest's output."""
        project = version_directory(version.root)
        scratch = os.path.join(constants.ROOT_DIR, f".staging-tests-{version.root}")
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("IVY_") and key not in ("VIRTUAL_ENV", "PYTHONPATH")
        }
        environment.update(
            {
                "IVY_DATA_DIR": os.path.join(scratch, "data"),
                "IVY_ROOT_DIR": os.path.join(scratch, "root"),
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        try:
            run_command(
                [
                    os.path.join(project, ".venv", "bin", "python"),
                    "-m",
                    "pytest",
                    "-m",
                    pytest_marker,
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "--basetemp",
                    os.path.join(scratch, "tmp"),
                ],
                timeout=TESTS_TIMEOUT_SECONDS,
                cwd=project,
                environment=environment,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @staticmethod
    def write_config(
        version: tum_esm_utils.validators.Version, foreign_config: ForeignConfig
    ) -> None:
        """Write the config into `<root>/<version>/config/` (with this
        installation's `config/.env`, if any) and have the new version's own
        CLI check it against its own schema. Raise `StepError` with the
        problems it names, secrets masked."""
        project = version_directory(version.root)
        path = os.path.join(project, "config", "config.json")
        foreign_config.dump(path)
        env_file = os.path.join(constants.CONFIG_DIR, ".env")
        if os.path.isfile(env_file) and os.path.dirname(path) != constants.CONFIG_DIR:
            shutil.copy2(env_file, os.path.join(project, "config", ".env"))
        check_config_with_version(project, path, secret_values_of(foreign_config))

    @staticmethod
    def update_cli_pointer(to_version: tum_esm_utils.validators.Version) -> None:
        """Point `<root>/ivy-cli.sh` (what systemd, cron and operators run) at
        the CLI of `<root>/<version>/`, replacing it atomically: a reader sees
        the old pointer or the new one, never a partial file."""
        version_dir = os.path.join(constants.ROOT_DIR, to_version.root)
        python = shlex.quote(os.path.join(version_dir, ".venv", "bin", "python"))
        cli_py = shlex.quote(os.path.join(version_dir, "cli.py"))
        write_atomically(
            cli_pointer_path(),
            "#!/bin/sh\n"
            "# Ivy's CLI pointer: the version this station runs (replaced by the updater)\n"
            f'exec {python} {cli_py} "$@"\n',
            mode=0o755,
        )

    @staticmethod
    def remove_old_venvs(
        current_version: tum_esm_utils.validators.Version,
        log_progress: Callable[[str], None],
        keep: tuple[str, ...] = (),
    ) -> None:
        """Remove the `.venv` of every version under the root except the
        current one (and those in `keep`, e.g. the previous version a
        rollback needs)."""
        if not os.path.isdir(constants.ROOT_DIR):
            return
        for name in sorted(os.listdir(constants.ROOT_DIR)):
            venv = os.path.join(constants.ROOT_DIR, name, ".venv")
            if name in (current_version.root, *keep) or not os.path.isdir(venv):
                continue
            shutil.rmtree(venv, ignore_errors=True)
            log_progress(f"removed the virtual environment of {name}")

    def perform_update(self, foreign_config: ForeignConfig) -> None:
        """Run every step of an update to `foreign_config`'s version in this
        process, acknowledging each with its duration; raise `StepError` (or
        `DownloadError`) naming the failed step. Called by the update worker;
        the main loop then switches (`switch_to`)."""
        updater_config = self.updater_config_of(foreign_config)
        version = foreign_config.general.software_version

        def log_progress(message: str) -> None:
            self.logger.info(message)

        steps: list[tuple[str, Callable[[], None], SoftwareUpdateState | None]] = [
            ("space", lambda: self.check_free_space(version), None),
            (
                "download",
                lambda: self.download_source_code(updater_config, version, log_progress),
                "DOWNLOADED",
            ),
            ("install", lambda: self.install_dependencies(version, log_progress), None),
            ("configure", lambda: self.write_config(version, foreign_config), None),
            ("tests", lambda: self.run_pytests(version, PYTEST_MARKER), "VERIFIED"),
        ]
        for step, action, reached in steps:
            started = time.monotonic()
            with StateInterface.update() as state:
                if state.update_in_progress is not None:
                    state.update_in_progress.step = step
                    state.update_in_progress.step_started_at = time.time()
            try:
                action()
            except Exception as e:
                raise StepError(f"{step}: {e}") from None
            self.acknowledge(
                foreign_config,
                "progress",
                step=step,
                step_seconds=time.monotonic() - started,
                software_update=reached,
            )

    # --- decisions (main loop) ---------------------------------------------

    @staticmethod
    def updater_config_of(foreign_config: ForeignConfig) -> UpdaterConfig:
        """The config's `updater` section, validated strictly; raise
        `ConfigError` naming the problem (no section: no known source)."""
        raw = foreign_config.to_dict().get("updater")
        if raw is None:
            raise ConfigError(
                "updater: null; a config for another software version needs an updater "
                "section that says where that version comes from"
            )
        try:
            return UpdaterConfig.model_validate(raw)
        except pydantic.ValidationError as e:
            raise ConfigError(format_validation_error(e, "updater")) from None

    def handle(self, foreign_config: ForeignConfig) -> Decision:
        """Judge one pending config: `Reconfigure` when it is for this version
        and valid, `StartUpdate` when it asks for another version that may be
        installed, None when it was ignored or rejected (acknowledged)."""
        revision = foreign_config.general.config_revision
        version = foreign_config.general.software_version
        if not config_revision_is_new(
            revision, self.config.general.config_revision, StateInterface.load()
        ):
            self.logger.info(f"ignoring config revision {revision}: handled already")
            return None
        if version.root != constants.VERSION.root:
            return self._judge_version_change(foreign_config)
        self.acknowledge(foreign_config, "received")
        try:
            new_config = Config.load_from_string(
                json.dumps(foreign_config.to_dict()), source=f"config revision {revision}"
            )
        except ConfigError as e:
            self.reject(foreign_config, str(e))
            return None

        # the running config stays at hand until the new one has proven itself
        self.config.dump(previous_config_path())
        journal = load_journal()
        journal.config_trial = ConfigTrialRecord(config_revision=revision, started_at=time.time())
        save_journal(journal)
        new_config.dump()
        self.config = new_config
        mark_config_revision_handled(revision)
        self.logger.info(
            f"applying config revision {revision} on trial; restarting procedures and backend"
        )
        return Reconfigure(new_config)

    def accept_tried_config(self, foreign_config: ForeignConfig) -> None:
        """The config proved healthy: acknowledge it and forget the previous
        one. Called by the main loop."""
        revision = foreign_config.general.config_revision
        self.acknowledge(foreign_config, "accepted")
        record_config_outcome(revision, foreign_config.general.software_version.root, "accepted")
        _end_config_trial()
        self.logger.info(f"accepted config revision {revision}: healthy")

    def reject_tried_config(self, foreign_config: ForeignConfig, problem: str) -> Config:
        """The config did not prove healthy: put the previous config back,
        reject this one with the reason and return the previous one (the main
        loop restarts its children with it). Called by the main loop."""
        previous = Config.load(previous_config_path())
        previous.dump()
        _end_config_trial()
        self.config = previous
        self.reject(foreign_config, f"the previous config is back: {problem}")
        return previous

    def _judge_version_change(self, foreign_config: ForeignConfig) -> Decision:
        version = foreign_config.general.software_version
        self.acknowledge(foreign_config, "received", software_update="DOWNLOADING")
        try:
            updater_config = self.updater_config_of(foreign_config)
        except ConfigError as e:
            self.reject(foreign_config, str(e))
            return None
        in_root = os.path.dirname(constants.PROJECT_DIR) == constants.ROOT_DIR
        if not in_root and not os.environ.get("IVY_DATA_DIR"):
            # the new version would live under the root with a data directory
            # of its own, and this queue would be left behind
            self.reject(
                foreign_config,
                f"general.software_version: this installation ({constants.PROJECT_DIR}) is not "
                f"a version directory under the root {constants.ROOT_DIR}, so another version "
                "would not share its queue; install with `ivy setup` to update remotely",
            )
            return None
        if version.root in load_journal().bad_versions:
            self.reject(
                foreign_config,
                f"general.software_version: {version.root} was rolled back on this station "
                "before; release a fixed version under a new number",
            )
            return None
        if version < constants.VERSION and not updater_config.allow_downgrades:
            self.reject(
                foreign_config,
                f"general.software_version: {version.root} is older than the running "
                f"{constants.VERSION.root}; set updater.allow_downgrades to go back",
            )
            return None
        self.logger.info(
            f"config revision {foreign_config.general.config_revision} asks for version "
            f"{version.root}: updating (procedures keep measuring meanwhile)"
        )
        return StartUpdate(foreign_config, updater_config)

    def switch_to(self, foreign_config: ForeignConfig) -> None:
        """After every step passed: note the candidate in the journal (on
        trial, with its config's trial settings) and remember the revision as
        handled. The pointer does not move yet: the main loop hands over to
        the guard (`version_trial`), which commits or rolls back. Called by
        the main loop."""
        from .update.version_trial import trial_settings

        version = foreign_config.general.software_version
        revision = foreign_config.general.config_revision
        settings = trial_settings(foreign_config.to_dict())
        journal = load_journal()
        journal.current = journal.current or constants.VERSION.root
        journal.candidate = Candidate(
            version=version.root,
            from_version=constants.VERSION.root,
            config_revision=revision,
            switched_at=time.time(),
            deadline_seconds=settings.deadline_seconds,
            stable_seconds=settings.stable_seconds,
            max_starts=settings.max_starts,
        )
        save_journal(journal)
        mark_config_revision_handled(revision)
        self.acknowledge(foreign_config, "progress", step="switch", software_update="UPDATING")
        self.logger.info(f"version {version.root} goes on trial; handing over to its guard")

    def abandon_update(self, foreign_config: ForeignConfig, reason: str) -> None:
        """A step failed: reject the config with the reason and remove what
        the update added under the root (never the running version, nor the
        previous one a rollback needs). Called by the main loop."""
        version = foreign_config.general.software_version.root
        directory = version_directory(version)
        keep = {os.path.realpath(constants.PROJECT_DIR)}
        previous = load_journal().previous
        if previous is not None:
            keep.add(os.path.realpath(version_directory(previous)))
        if os.path.realpath(directory) not in keep:
            shutil.rmtree(directory, ignore_errors=True)
        self.reject(foreign_config, f"the update to {version} failed at {reason}")

    def reject(self, foreign_config: ForeignConfig, reason: str) -> None:
        """Acknowledge a config as rejected and remember its revision as such.
        A config that asked for another version also reports the update as
        failed."""
        revision = foreign_config.general.config_revision
        version = foreign_config.general.software_version.root
        reason = mask_secrets_of(foreign_config, reason)
        mark_config_revision_rejected(revision)
        record_config_outcome(revision, version, "rejected", reason)
        self.logger.warning(f"rejected config revision {revision}", details=reason)
        self.acknowledge(
            foreign_config,
            "rejected",
            reason,
            software_update="FAILED" if version != constants.VERSION.root else None,
        )

    def acknowledge(
        self,
        foreign_config: ForeignConfig,
        status: Literal["received", "progress", "accepted", "rejected"],
        reason: str | None = None,
        *,
        step: str | None = None,
        step_seconds: float | None = None,
        software_update: SoftwareUpdateState | None = None,
    ) -> None:
        """Queue the answer about a config (secrets redacted)."""
        self.messaging_agent.add_message(
            ConfigMessageBody.about(
                status,
                foreign_config.to_dict(),
                reason,
                step=step,
                step_seconds=step_seconds,
                software_update=software_update,
            )
        )


def secret_values_of(foreign_config: ForeignConfig) -> set[str]:
    """The values of every secret field of a received config."""
    return secret_values(foreign_config.to_dict())


def mask_secrets_of(foreign_config: ForeignConfig, text: str) -> str:
    """`text` with every secret value of the config masked."""
    return mask(text, secret_values_of(foreign_config))


def forget_interrupted_update(logger: Logger) -> None:
    """At the start of a main loop: an update noted in the state was cut off
    (its worker died with the previous main loop). Nothing of it was switched
    to, and its revision was not marked handled, so the same config is tried
    again when it next arrives. Called by the main loop."""
    with StateInterface.update() as state:
        interrupted = state.update_in_progress
        state.update_in_progress = None
    if interrupted is not None:
        logger.warning(
            f"the update to version {interrupted.version} (config revision "
            f"{interrupted.config_revision}) was interrupted at step {interrupted.step}; "
            "it is tried again when the config next arrives"
        )


def deliver_pending_answer(logger: Logger, messaging_agent: MessagingAgent) -> None:
    """At the start of a main loop: send the answer a version trial left in
    the journal (accepted by the committed version, or rejected by the
    previous one after a rollback) and remember the outcome. Called by the
    main loop (never by a candidate on trial)."""
    journal = load_journal()
    answer = journal.pending_answer
    if journal.current != constants.VERSION.root and journal.candidate is None:
        journal.current = constants.VERSION.root
    if answer is None:
        save_journal(journal)
        return
    config: dict[str, object] = {
        "general": {
            "config_revision": answer.config_revision,
            "software_version": answer.software_version,
        }
    }
    if answer.status == "accepted":
        mark_config_revision_handled(answer.config_revision)
        logger.info(journal.last_outcome or f"now running {answer.software_version}")
    else:
        mark_config_revision_rejected(answer.config_revision)
        logger.warning(f"version {answer.software_version} was rolled back", details=answer.reason)
    record_config_outcome(
        answer.config_revision, answer.software_version, answer.status, answer.reason
    )
    messaging_agent.add_message(
        ConfigMessageBody.about(
            answer.status,
            config,
            answer.reason,
            software_update="UPDATED" if answer.status == "accepted" else "FAILED",
        )
    )
    journal.pending_answer = None
    save_journal(journal)
