"""Apply configs that arrived from the backend (queued in `state.pending_configs`).

A config for the running software version is validated against the full schema,
written atomically to `config/config.json`, and handed back to the main loop,
which restarts its children with it. Every outcome is acknowledged through the
message queue. Software version changes are refused with a clear reason: this
version cannot install other versions yet, and refusing leaves the running
version untouched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Callable
from typing import Literal

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

from .logger import Logger
from .messaging_agent import MessagingAgent
from .source_download import download_source_code
from .state_interface import StateInterface

_REJECTED_REVISIONS_KEPT = 32


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


class Updater:
    """Decides about pending configs. Used by the main loop only."""

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

    def handle(self, foreign_config: ForeignConfig) -> Config | None:
        """Apply one pending config; return the new `Config` when the children must
        be restarted with it, None when it was ignored or rejected."""
        revision = foreign_config.general.config_revision
        version = foreign_config.general.software_version.root
        if not config_revision_is_new(
            revision, self.config.general.config_revision, StateInterface.load()
        ):
            self.logger.info(f"ignoring config revision {revision}: handled already")
            return None
        self._acknowledge(foreign_config, "received")

        if version != constants.VERSION.root:
            self._reject(
                foreign_config,
                f"general.software_version: {version} differs from the running "
                f"{constants.VERSION.root}; this version of Ivy applies config changes only",
            )
            return None
        try:
            new_config = Config.load_from_string(
                json.dumps(foreign_config.to_dict()), source=f"config revision {revision}"
            )
        except ConfigError as e:
            self._reject(foreign_config, str(e))
            return None

        new_config.dump()
        self.config = new_config
        mark_config_revision_handled(revision)
        self._acknowledge(foreign_config, "accepted")
        self.logger.info(f"accepted config revision {revision}; restarting procedures and backend")
        return new_config

    def _reject(self, foreign_config: ForeignConfig, reason: str) -> None:
        mark_config_revision_rejected(foreign_config.general.config_revision)
        self.logger.warning(
            f"rejected config revision {foreign_config.general.config_revision}", details=reason
        )
        self._acknowledge(foreign_config, "rejected", reason)

    def _acknowledge(
        self,
        foreign_config: ForeignConfig,
        status: Literal["received", "accepted", "rejected"],
        reason: str | None = None,
    ) -> None:
        self.messaging_agent.add_message(
            ConfigMessageBody.about(status, foreign_config.to_dict(), reason)
        )
