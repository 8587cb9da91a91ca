"""Fetch the source of tag `v<version>` into `<root>/<version>/`, safely: into a
staging directory first (cleaned up at the next start if a crash left it),
checked, then renamed into place in one step. Sources: a GitHub or GitLab
tarball over HTTPS with the token in a request header, or any git URL or local
repository. No value from a config reaches a shell or a command line option,
and a token never appears in a URL, an argument list or a log line.
Called by the updater's worker (`Updater.download_source_code`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import tum_esm_utils.files

from src import constants
from src.types import UpdaterConfig

_STAGING_PREFIX = ".staging-"
_DOWNLOAD_TIMEOUT_SECONDS = 120
_MAX_ARCHIVE_BYTES = 200 * 1024 * 1024
_GIT_TIMEOUT_SECONDS = 300


class DownloadError(Exception):
    """The source could not be fetched or did not check out; the message says
    why (never with a token in it)."""


def version_directory(version: str) -> str:
    """`<root>/<version>`."""
    return os.path.join(constants.ROOT_DIR, version)


def remove_stale_staging() -> list[str]:
    """Delete staging directories a crash left behind; return their names.
    Called when an update starts (and by the main loop at start)."""
    if not os.path.isdir(constants.ROOT_DIR):
        return []
    removed = []
    for name in os.listdir(constants.ROOT_DIR):
        if name.startswith(_STAGING_PREFIX):
            shutil.rmtree(os.path.join(constants.ROOT_DIR, name), ignore_errors=True)
            removed.append(name)
    return removed


def tarball_request(config: UpdaterConfig, version: str) -> urllib.request.Request:
    """The HTTPS request for a GitHub or GitLab tarball of tag `v<version>`,
    the token (if any) in a header."""
    tag = f"v{version}"
    headers = {"User-Agent": f"{constants.NAME}-updater"}
    token = config.access_token.get_secret_value() if config.access_token else None
    if config.source == "github":
        owner_name = urllib.parse.quote(config.repository, safe="/")
        url = f"https://api.github.com/repos/{owner_name}/tarball/{urllib.parse.quote(tag)}"
        if token:
            headers["Authorization"] = f"Bearer {token}"
    elif config.source == "gitlab":
        project = urllib.parse.quote(config.repository, safe="")
        url = (
            f"https://{config.host or 'gitlab.com'}/api/v4/projects/{project}"
            f"/repository/archive.tar.gz?sha={urllib.parse.quote(tag)}"
        )
        if token:
            headers["PRIVATE-TOKEN"] = token
    else:
        raise DownloadError(f"updater.source: {config.source!r} has no tarball")
    return urllib.request.Request(url, headers=headers)  # noqa: S310 - https only


def _download(request: urllib.request.Request, path: str) -> None:
    if not request.full_url.startswith("https://"):
        raise DownloadError("only HTTPS downloads are allowed")
    try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as response:  # noqa: S310
            with open(path, "wb") as f:
                size = 0
                while chunk := response.read(1 << 16):
                    size += len(chunk)
                    if size > _MAX_ARCHIVE_BYTES:
                        raise DownloadError(f"the archive exceeds {_MAX_ARCHIVE_BYTES} bytes")
                    f.write(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"the download failed: {reason}") from None


def extract_safely(archive: str, destination: str) -> None:
    """Extract a tarball whose members all lie in one top-level directory into
    `destination` (that directory's content), refusing absolute paths, paths
    that escape, links that point outside, and devices (tarfile's data
    filter, plus the single-root check)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if member.name.startswith("/") or ".." in member.name.split("/"):
                    raise DownloadError(f"unsafe archive member refused: {member.name!r}")
            roots = {m.name.split("/", 1)[0] for m in members}
            if len(roots) != 1:
                raise DownloadError(f"expected one top-level directory, found {len(roots)}")
            root = roots.pop()
            extracted = destination + ".extract"
            tar.extractall(extracted, filter="data")
    except tarfile.FilterError as e:
        raise DownloadError(f"unsafe archive member refused: {e}") from None
    except (tarfile.TarError, OSError) as e:
        raise DownloadError(f"the archive cannot be read: {e}") from None
    os.replace(os.path.join(extracted, root), destination)
    shutil.rmtree(extracted, ignore_errors=True)


def _git_clone(config: UpdaterConfig, version: str, destination: str) -> None:
    environment = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    if config.access_token is not None:
        # a header through the environment: never in argv (visible in ps) or a URL
        environment.update(
            {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Bearer "
                f"{config.access_token.get_secret_value()}",
            }
        )
    command = [
        "git",
        "-c",
        "advice.detachedHead=false",
        "clone",
        "--quiet",
        "--depth",
        "1",
        "--branch",
        f"v{version}",
        "--",  # the repository can never be taken for an option
        config.repository,
        destination,
    ]
    try:
        result = subprocess.run(
            command,
            env=environment,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DownloadError(f"git clone took longer than {_GIT_TIMEOUT_SECONDS} s") from None
    if result.returncode != 0:
        raise DownloadError(f"git clone failed: {result.stderr.strip()[-1_000:]}")
    shutil.rmtree(os.path.join(destination, ".git"), ignore_errors=True)


def download_source_code(
    config: UpdaterConfig, version: str, log_progress: Callable[[str], None]
) -> str:
    """Fetch tag `v<version>` into `<root>/<version>` and return that path.
    A version directory that exists already is left as it is and returned.
    Raise `DownloadError` with the reason otherwise."""
    target = version_directory(version)
    if os.path.isdir(target):
        log_progress(f"{target} exists already")
        return target
    os.makedirs(constants.ROOT_DIR, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{version}-", dir=constants.ROOT_DIR)
    try:
        source = os.path.join(staging, "source")
        if config.source == "git":
            log_progress(f"cloning tag v{version}")
            _git_clone(config, version, source)
        else:
            log_progress(f"downloading the {config.source} tarball of v{version}")
            archive = os.path.join(staging, "source.tar.gz")
            _download(tarball_request(config, version), archive)
            extract_safely(archive, source)
        _check_version(source, version)
        os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log_progress(f"source of v{version} is in {target}")
    return target


def _check_version(source: str, version: str) -> None:
    path = os.path.join(source, "pyproject.toml")
    try:
        found = tum_esm_utils.files.load_toml_file(path)["project"]["version"]
    except (OSError, KeyError, ValueError) as e:
        raise DownloadError(f"the source has no readable pyproject.toml ({e})") from None
    if found != version:
        raise DownloadError(f"the source of tag v{version} says it is version {found}")
