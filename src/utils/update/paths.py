"""Where the pieces of remote change live: version directories under the
production root, the CLI pointer, the config kept during a trial, the journal,
the trust policy. Paths are computed at call time from `src.constants`, so
that a process (or a test) that points the constants elsewhere is obeyed."""

from __future__ import annotations

import os

from src import constants


def version_directory(version: str) -> str:
    """`<root>/<version>`."""
    return os.path.join(constants.ROOT_DIR, version)


def runs_from_production_root() -> bool:
    """Whether this installation is a version directory under the root (set
    up by `ivy setup`), so that another version would share its data."""
    return constants.is_version_directory(constants.PROJECT_DIR)


def cli_pointer_path() -> str:
    """`<root>/ivy-cli.sh`, the CLI of the version the station runs."""
    return os.path.join(constants.ROOT_DIR, f"{constants.NAME}-cli.sh")


def previous_config_path() -> str:
    """Where the config that ran before a config on trial waits
    (`config/config.previous.json`)."""
    return os.path.join(os.path.dirname(constants.CONFIG_PATH), "config.previous.json")


def candidate_output_path(version: str) -> str:
    """Where a candidate's console output goes: `<data>/logs/candidate-<v>.txt`."""
    return os.path.join(constants.LOGS_DIR, f"candidate-{version}.txt")


def journal_path() -> str:
    """`<data>/update-journal.json`."""
    return os.path.join(constants.DATA_DIR, "update-journal.json")


def journal_lock_path() -> str:
    """`<data>/update-journal.lock`, held across every edit of the journal."""
    return os.path.join(constants.DATA_DIR, "update-journal.lock")


def trust_directory() -> str:
    """`<root>/trust`: the station's trust policy and its signers, written only
    by local commands (`ivy setup`, `ivy trust set`)."""
    return os.path.join(constants.ROOT_DIR, "trust")


def staging_prefix() -> str:
    """Directories under the root that start with this are work in progress
    of an update (removed at the next start)."""
    return ".staging-"
