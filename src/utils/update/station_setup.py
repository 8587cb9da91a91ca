"""`ivy setup`: install a first version into a production root, with no
prompts: `<root>/<version>/` (fetched like an update), its own `.venv`
(exact, from its lock), its config (given, or its template), `<root>/.env`
naming the root (so every version finds the shared `<root>/data/`), and the
CLI pointer `<root>/ivy-cli.sh`. Called by the CLI only."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pydantic
import tum_esm_utils.validators

from src import constants
from src.types import UpdaterConfig
from src.types.atomic_file import write_atomically
from src.types.config import format_validation_error

from ..updater import (
    INSTALL_TIMEOUT_SECONDS,
    Updater,
    check_config_with_version,
    cli_pointer_path,
)
from .commands import StepError
from .dependencies import install_locked_dependencies
from .source import DownloadError, download_source_code, version_directory

ROOT_ENV_FILE = ".env"


class SetupError(Exception):
    """The setup cannot go on; the message says why (no secrets in it)."""


def _initial_config(
    project: str, version: str, config_path: str | None, updater: dict[str, Any]
) -> dict[str, Any]:
    path = config_path or os.path.join(project, "config", "config.template.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("general"), dict):
        raise SetupError(f"{path}: general: expected a JSON object")
    found = config["general"].get("software_version")
    if config_path is not None and found != version:
        raise SetupError(
            f"{path}: general.software_version is {found!r}, but version {version} is installed"
        )
    config["general"]["software_version"] = version
    if config.get("updater") is None:  # so that remote updates know where versions come from
        config["updater"] = updater
    return config


def _write_root_env(root: str) -> None:
    path = os.path.join(root, ROOT_ENV_FILE)
    lines: list[str] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if not line.startswith("IVY_ROOT_DIR=")]
    write_atomically(path, "\n".join([*lines, f"IVY_ROOT_DIR={root}"]) + "\n", mode=0o644)


def set_up_station(
    *,
    root: str,
    source: str,
    repository: str,
    version: str,
    host: str | None,
    config_path: str | None,
    access_token: str | None,
    log_progress: Callable[[str], None],
) -> str:
    """Install `version` into `root` and return the CLI pointer's path.
    Raise `SetupError` naming the step and the reason."""
    root = os.path.abspath(os.path.expanduser(root))
    try:
        parsed_version = tum_esm_utils.validators.Version(version)
    except pydantic.ValidationError:
        raise SetupError(f"--version: {version!r} is not a plain version such as 1.2.3") from None
    updater_section: dict[str, Any] = {"source": source, "repository": repository, "host": host}
    try:
        updater_config = UpdaterConfig.model_validate(
            {**updater_section, "access_token": access_token}
        )
    except pydantic.ValidationError as e:
        raise SetupError(format_validation_error(e, "updater settings")) from None
    if access_token is not None:
        updater_section["access_token"] = access_token

    os.makedirs(root, exist_ok=True)
    # this process only installs into `root`: every path below derives from it
    constants.ROOT_DIR = root
    project = version_directory(version)
    try:
        download_source_code(updater_config, version, log_progress)
        install_locked_dependencies(project, log_progress, INSTALL_TIMEOUT_SECONDS)
        config = _initial_config(project, version, config_path, updater_section)
        config_file = os.path.join(project, "config", "config.json")
        write_atomically(config_file, json.dumps(config, indent=4) + "\n")
        log_progress(f"checking {config_file} with version {version}'s own schema")
        check_config_with_version(project, config_file, [access_token] if access_token else [])
    except (DownloadError, StepError) as e:
        raise SetupError(str(e)) from None
    _write_root_env(root)
    Updater.update_cli_pointer(parsed_version)
    return cli_pointer_path()
