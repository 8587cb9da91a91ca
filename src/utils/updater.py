"""The reference API's `Updater`: the steps of a software update under their
documented names and signatures. The work is done by the `update` package
(`update.steps` for the steps, `update.coordinator` for the decisions the main
loop takes each turn); this class is what procedure authors and Ivy 1.1 code
know."""

from __future__ import annotations

from collections.abc import Callable

import tum_esm_utils.validators

from src.types import Config, ForeignConfig, UpdaterConfig
from src.types.state import PendingConfig

from .logger import Logger
from .messaging_agent import MessagingAgent
from .update import steps
from .update.answers import Answers
from .update.source import DownloadError
from .update.trust import TrustError, load_policy


class Updater:
    """Checks, downloads, installs and tests a new version, moves the CLI
    pointer and removes old venvs (each step on its own, or all of them with
    `perform_update`)."""

    def __init__(
        self,
        config: Config,
        logger: Logger | None = None,
        messaging_agent: MessagingAgent | None = None,
    ) -> None:
        """Prepare to update from the running `config`."""
        self.config = config
        self.logger = logger or Logger(config, "updater")
        self.messaging_agent = messaging_agent or MessagingAgent(config)

    @staticmethod
    def download_source_code(
        updater_config: UpdaterConfig,
        version: tum_esm_utils.validators.Version,
        log_progress: Callable[[str], None],
    ) -> None:
        """Fetch tag `v<version>` of the trust policy's pinned source into
        `<root>/<version>/`, its signature verified (see `update.source`);
        `updater_config` must name that source and may carry the token. Raise
        `DownloadError` with the reason when it cannot."""
        try:
            policy = load_policy()
        except TrustError as e:
            raise DownloadError(str(e)) from None
        pinned = policy.release_source if policy is not None else None
        if pinned is None or not pinned.named_by(updater_config.model_dump()):
            raise DownloadError(
                "updater: not the release source this station's trust policy pins; "
                "versions come only from that one"
            )
        token = updater_config.access_token
        steps.download_release(
            version.root, token.get_secret_value() if token else None, log_progress
        )

    @staticmethod
    def install_dependencies(
        version: tum_esm_utils.validators.Version,
        log_progress: Callable[[str], None],
        installation_command: str | None = None,
    ) -> None:
        """Create `<root>/<version>/.venv` with exactly the locked runtime and
        `gate` dependencies of that version's `pdm.lock`; `installation_command`
        replaces that with a command of the caller's, run without a shell."""
        steps.install_dependencies(version, log_progress, installation_command)

    @staticmethod
    def run_pytests(version: tum_esm_utils.validators.Version, pytest_marker: str) -> None:
        """Run `pytest -m <pytest_marker>` of `<root>/<version>/` in its own
        venv with data and root directories of its own; raise `StepError`
        with the tail of pytest's output."""
        steps.run_pytests(version, pytest_marker)

    @staticmethod
    def update_cli_pointer(to_version: tum_esm_utils.validators.Version) -> None:
        """Point `<root>/ivy-cli.sh` at `<root>/<version>/`, atomically."""
        steps.update_cli_pointer(to_version)

    @staticmethod
    def remove_old_venvs(
        current_version: tum_esm_utils.validators.Version,
        log_progress: Callable[[str], None],
        keep: tuple[str, ...] = (),
    ) -> None:
        """Remove the `.venv` of every version under the root but the current
        one and those in `keep`."""
        steps.remove_old_venvs(current_version, log_progress, keep)

    def perform_update(self, foreign_config: ForeignConfig) -> None:
        """Run every step of an update to `foreign_config`'s version in this
        process, answering each; raise `StepError` naming the failed step."""
        steps.perform_update(
            PendingConfig(config=foreign_config, origin="local"),
            Answers(self.logger, self.messaging_agent),
            self.logger,
        )
