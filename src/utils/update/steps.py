"""The steps of a software update, each usable on its own: check the disk,
fetch and verify the release, install its locked dependencies into its own
venv, write and check the config with the new version's own schema, run its
`version_change` tests; and the moves around it: the CLI pointer, the removal
of old venvs. `perform_update` runs them in order in the update worker, each
with its own timeout, and answers each step.

No config value reaches a shell; commands are argument lists run by
`commands.run_command`, and their output is masked before anyone sees it."""

from __future__ import annotations

import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterable

import tum_esm_utils.validators

from src import constants
from src.types import ForeignConfig
from src.types.atomic_file import write_atomically
from src.types.config import mask_secrets, secret_values
from src.types.messages import SoftwareUpdateState
from src.types.state import PendingConfig

from ..logger import Logger
from ..state_interface import StateInterface
from .answers import Answers
from .commands import StepError, run_command
from .dependencies import install_locked_dependencies
from .paths import cli_pointer_path, version_directory
from .source import fetch_release
from .trust import TrustError, load_policy

PYTEST_MARKER = "version_change"
INSTALL_TIMEOUT_SECONDS = 900.0
TESTS_TIMEOUT_SECONDS = 900.0
CONFIG_CHECK_TIMEOUT_SECONDS = 60.0
# free space asked for beyond the estimated size of the new version
DISK_MARGIN_BYTES = 100 * 1024 * 1024
ACCESS_TOKEN_VARIABLE = "IVY_ACCESS_TOKEN"  # noqa: S105 - a variable's name


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


def access_token_of(raw_config: object) -> str | None:
    """The token for the release source: the config's `updater.access_token`,
    else `IVY_ACCESS_TOKEN` (from the environment or a `.env` file)."""
    updater = raw_config.get("updater") if isinstance(raw_config, dict) else None
    token = updater.get("access_token") if isinstance(updater, dict) else None
    if isinstance(token, str) and token:
        return token
    return os.environ.get(ACCESS_TOKEN_VARIABLE) or None


def download_release(version: str, token: str | None, log_progress: Callable[[str], None]) -> str:
    """Fetch and verify tag `v<version>` of the trust policy's pinned source
    into `<root>/<version>/` (see `source`); raise `DownloadError` or
    `StepError` with the reason."""
    try:
        policy = load_policy()
    except TrustError as e:
        raise StepError(str(e)) from None
    if policy is None:
        raise StepError("this station has no trust policy: no release can be verified")
    return fetch_release(policy, version, token, log_progress)


def install_dependencies(
    version: tum_esm_utils.validators.Version,
    log_progress: Callable[[str], None],
    installation_command: str | None = None,
) -> None:
    """Create `<root>/<version>/.venv` with exactly the locked runtime and
    `gate` dependencies of that version's `pdm.lock` (see `dependencies`).
    `installation_command` (the reference API's) replaces that with a command
    of the caller's, split into arguments and run without a shell."""
    project = version_directory(version.root)
    if installation_command is None:
        install_locked_dependencies(project, log_progress, INSTALL_TIMEOUT_SECONDS)
        return
    log_progress(f"running {installation_command!r} in {project}")
    run_command(shlex.split(installation_command), timeout=INSTALL_TIMEOUT_SECONDS, cwd=project)


def check_config_with_version(project: str, path: str, secrets: Iterable[str]) -> None:
    """Have the CLI of the version in `project` (in its own venv) check the
    config at `path` against that version's own schema; raise `StepError`
    with the problems it names, secrets masked. Called by the update worker
    and by `ivy setup`, on verified releases only."""
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


def write_config(version: tum_esm_utils.validators.Version, foreign_config: ForeignConfig) -> None:
    """Write the config into `<root>/<version>/config/` (with this
    installation's `config/.env`, if any, kept private) and have the new
    version's own CLI check it against its own schema."""
    project = version_directory(version.root)
    path = os.path.join(project, "config", "config.json")
    foreign_config.dump(path)
    env_file = os.path.join(constants.CONFIG_DIR, ".env")
    if os.path.isfile(env_file) and os.path.dirname(path) != constants.CONFIG_DIR:
        with open(env_file, encoding="utf-8") as f:
            write_atomically(os.path.join(project, "config", ".env"), f.read(), mode=0o600)
    check_config_with_version(project, path, secret_values(foreign_config.to_dict()))


def run_pytests(version: tum_esm_utils.validators.Version, pytest_marker: str) -> None:
    """Run `pytest -m <pytest_marker>` of `<root>/<version>/` in its own venv,
    with data and root directories of its own (removed afterwards), so that
    the tests can never touch the running station's queue, state or config."""
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


def update_cli_pointer(to_version: tum_esm_utils.validators.Version) -> None:
    """Point `<root>/ivy-cli.sh` (what systemd, cron and operators run) at the
    CLI of `<root>/<version>/`, replacing it atomically: a reader sees the old
    pointer or the new one, never a partial file."""
    version_dir = version_directory(to_version.root)
    python = shlex.quote(os.path.join(version_dir, ".venv", "bin", "python"))
    cli_py = shlex.quote(os.path.join(version_dir, "cli.py"))
    write_atomically(
        cli_pointer_path(),
        "#!/bin/sh\n"
        "# Ivy's CLI pointer: the version this station runs (replaced by the updater)\n"
        f'exec {python} {cli_py} "$@"\n',
        mode=0o755,
    )


def remove_old_venvs(
    current_version: tum_esm_utils.validators.Version,
    log_progress: Callable[[str], None],
    keep: tuple[str, ...] = (),
) -> None:
    """Remove the `.venv` of every version under the root except the current
    one (and those in `keep`, e.g. the previous version a rollback needs)."""
    if not os.path.isdir(constants.ROOT_DIR):
        return
    for name in sorted(os.listdir(constants.ROOT_DIR)):
        venv = os.path.join(constants.ROOT_DIR, name, ".venv")
        if name in (current_version.root, *keep) or not os.path.isdir(venv):
            continue
        shutil.rmtree(venv, ignore_errors=True)
        log_progress(f"removed the virtual environment of {name}")


def perform_update(pending: PendingConfig, answers: Answers, logger: Logger) -> None:
    """Run every step of an update to `pending`'s version in this process,
    answering each with its duration; raise `StepError` (or `DownloadError`)
    naming the failed step. Called by the update worker; the main loop then
    hands over to the version's trial."""
    foreign_config = pending.config
    version = foreign_config.general.software_version
    token = access_token_of(foreign_config.to_dict())

    def log_progress(message: str) -> None:
        logger.info(message)

    steps: list[tuple[str, Callable[[], object], SoftwareUpdateState | None]] = [
        ("space", lambda: check_free_space(version), None),
        ("download", lambda: download_release(version.root, token, log_progress), "DOWNLOADED"),
        ("install", lambda: install_dependencies(version, log_progress), None),
        ("configure", lambda: write_config(version, foreign_config), None),
        ("tests", lambda: run_pytests(version, PYTEST_MARKER), "VERIFIED"),
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
            secrets = {*secret_values(foreign_config.to_dict()), *([token] if token else [])}
            raise StepError(mask_secrets(f"{step}: {e}", secrets)) from None
        answers.acknowledge(
            pending,
            "progress",
            step=step,
            step_seconds=time.monotonic() - started,
            software_update=reached,
        )
