"""`ivy setup`: install a first version into the production root, with no
prompts: the trust policy (`<root>/trust/`: signers, pinned release source,
broker hosts), `<root>/<version>/` (fetched and verified like an update), its
own `.venv` (exact, from its lock), its config (given, or its template),
`<root>/.env` naming the root (so every version finds the shared
`<root>/data/`) and holding the source's token if there is one, and the CLI
pointer `<root>/ivy-cli.sh`.

Every path derives from `constants.ROOT_DIR`: the CLI runs this in a process
whose `IVY_ROOT_DIR` is the root being set up. Called by the CLI only."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic
import tum_esm_utils.validators

from src import constants
from src.types.atomic_file import write_atomically
from src.types.config import format_validation_error

from .commands import StepError
from .dependencies import install_locked_dependencies
from .paths import cli_pointer_path, version_directory
from .source import DownloadError, fetch_release
from .steps import (
    ACCESS_TOKEN_VARIABLE,
    INSTALL_TIMEOUT_SECONDS,
    check_config_with_version,
    update_cli_pointer,
)
from .trust import (
    CONFIG_NAMESPACE,
    RELEASE_NAMESPACE,
    ReleaseSource,
    TrustError,
    TrustPolicy,
    allowed_signers_from,
    write_trust,
)

ROOT_ENV_FILE = ".env"


class SetupError(Exception):
    """The setup cannot go on; the message says why (no secrets in it)."""


@dataclass(frozen=True)
class SetupRequest:
    """What `ivy setup` was asked for."""

    source: str
    repository: str
    version: str
    host: str | None = None
    config_path: str | None = None
    access_token: str | None = None
    config_signers_path: str | None = None
    release_signers_path: str | None = None
    accept_unsigned_configs: bool = False
    accept_unsigned_releases: bool = False
    broker_hosts: list[str] | None = None
    allow_tls_off: bool = False
    allow_downgrades: bool = False


def read_signers(path: str | None, namespace: str, option: str, opt_out: str) -> str | None:
    """The allowed_signers text for the file given with `option`, or None
    when the named opt-out was chosen instead; raise `SetupError` when
    neither (signatures are required by default) or the file is unusable."""
    if path is None:
        raise SetupError(
            f"{option} FILE is required (OpenSSH public keys or an allowed_signers file); "
            f"{opt_out} is the explicit opt-out"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1_000_000)
    except OSError as e:
        raise SetupError(f"{option} {path}: cannot be read ({e.strerror})") from None
    try:
        return allowed_signers_from(text, namespace, f"{option} {path}")
    except TrustError as e:
        raise SetupError(str(e)) from None


def _broker_hosts_of(config: dict[str, Any]) -> list[str]:
    hosts: list[str] = []
    sections = [config.get("backend")]
    backends = config.get("backends")
    if isinstance(backends, dict):
        sections += list(backends.values())
    for section in sections:
        if not isinstance(section, dict):
            continue
        addresses = [section, *(section.get("failover") or [])]
        for address in addresses:
            host = address.get("mqtt_host") if isinstance(address, dict) else None
            if isinstance(host, str) and host not in hosts:
                hosts.append(host)
    return hosts


def _initial_config(
    project: str, version: str, config_path: str | None, source: ReleaseSource
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
    updater = config.get("updater")
    if updater is not None and not source.named_by(updater):
        raise SetupError(
            f"{path}: updater names another release source than --source/--repository/--host; "
            "leave it out (the trust policy pins the source)"
        )
    config["general"]["software_version"] = version
    return config


def _write_root_env(root: str, values: dict[str, str]) -> None:
    path = os.path.join(root, ROOT_ENV_FILE)
    lines: list[str] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.split("=", 1)[0] not in values]
    lines += [f"{key}={value}" for key, value in values.items()]
    write_atomically(path, "\n".join(lines) + "\n", mode=0o600)


def set_up_station(request: SetupRequest, log_progress: Callable[[str], None]) -> str:
    """Install `request.version` into the root (`constants.ROOT_DIR`) and
    return the CLI pointer's path. Raise `SetupError` naming the step and the
    reason."""
    root = constants.ROOT_DIR
    version = request.version
    try:
        parsed_version = tum_esm_utils.validators.Version(version)
    except pydantic.ValidationError:
        raise SetupError(f"--version: {version!r} is not a plain version such as 1.2.3") from None
    try:
        source = ReleaseSource.model_validate(
            {"source": request.source, "repository": request.repository, "host": request.host}
        )
    except pydantic.ValidationError as e:
        raise SetupError(format_validation_error(e, "the release source")) from None
    config_signers = (
        None
        if request.accept_unsigned_configs
        else read_signers(
            request.config_signers_path,
            CONFIG_NAMESPACE,
            "--config-signers",
            "--accept-unsigned-configs",
        )
    )
    release_signers = (
        None
        if request.accept_unsigned_releases
        else read_signers(
            request.release_signers_path,
            RELEASE_NAMESPACE,
            "--release-signers",
            "--accept-unsigned-releases",
        )
    )
    os.makedirs(root, exist_ok=True)
    given: dict[str, Any] = {}
    if request.config_path is not None:
        given = _initial_config(root, version, request.config_path, source)
    policy = TrustPolicy(
        accept_unsigned_configs=request.accept_unsigned_configs,
        accept_unsigned_releases=request.accept_unsigned_releases,
        release_source=source,
        broker_hosts=(
            request.broker_hosts if request.broker_hosts is not None else _broker_hosts_of(given)
        ),
        allow_tls_off=request.allow_tls_off,
        allow_downgrades=request.allow_downgrades,
    )
    write_trust(policy, config_signers, release_signers)
    log_progress(f"wrote the trust policy into {os.path.join(root, 'trust')}")
    project = version_directory(version)
    try:
        fetch_release(policy, version, request.access_token, log_progress)
        install_locked_dependencies(project, log_progress, INSTALL_TIMEOUT_SECONDS)
        config = _initial_config(project, version, request.config_path, source)
        config_file = os.path.join(project, "config", "config.json")
        write_atomically(config_file, json.dumps(config, indent=4) + "\n")
        log_progress(f"checking {config_file} with version {version}'s own schema")
        secrets = [request.access_token] if request.access_token else []
        check_config_with_version(project, config_file, secrets)
    except (DownloadError, StepError) as e:
        raise SetupError(str(e)) from None
    environment = {"IVY_ROOT_DIR": root}
    if request.access_token:
        environment[ACCESS_TOKEN_VARIABLE] = request.access_token
    _write_root_env(root, environment)
    update_cli_pointer(parsed_version)
    return cli_pointer_path()
