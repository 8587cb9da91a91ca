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

from src import constants
from src.types import Config, ConfigError, ConfigMessageBody, ForeignConfig, redact_secrets

from .logger import Logger
from .messaging_agent import MessagingAgent
from .state_interface import StateInterface


def mark_config_revision_handled(revision: int) -> None:
    """Remember that a revision was accepted or rejected, so that a retained
    copy arriving again after a reconnect is not judged twice. Called by the
    updater and by backends that reject a config on arrival."""
    with StateInterface.update() as state:
        state.highest_handled_config_revision = max(
            revision, state.highest_handled_config_revision or revision
        )


class Updater:
    """Decides about pending configs. Used by the main loop only."""

    def __init__(self, config: Config, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Prepare to judge configs against the running `config`."""
        self.config = config
        self.logger = logger
        self.messaging_agent = messaging_agent

    def handle(self, foreign_config: ForeignConfig) -> Config | None:
        """Apply one pending config; return the new `Config` when the children must
        be restarted with it, None when it was ignored or rejected."""
        revision = foreign_config.general.config_revision
        version = foreign_config.general.software_version.root
        current_revision = self.config.general.config_revision
        if revision <= current_revision:
            self.logger.info(
                f"ignoring config revision {revision}: "
                f"not newer than the current {current_revision}"
            )
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
        mark_config_revision_handled(foreign_config.general.config_revision)
        self.logger.warning(
            f"rejected config revision {foreign_config.general.config_revision}", details=reason
        )
        self._acknowledge(foreign_config, "rejected", reason)

    def _acknowledge(
        self, foreign_config: ForeignConfig, status: str, reason: str | None = None
    ) -> None:
        self.messaging_agent.add_message(
            ConfigMessageBody.model_validate(
                {
                    "status": status,
                    "config_revision": foreign_config.general.config_revision,
                    "software_version": foreign_config.general.software_version.root,
                    "reason": reason,
                    "config": redact_secrets(foreign_config.to_dict()),
                }
            )
        )
