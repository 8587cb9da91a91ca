"""A production root for tests and benchmarks of software updates: a git
repository of releases made from this very checkout with bumped versions,
`ivy setup` into a temporary root, and the station driven through its CLI
pointer. Offline but for the package registry."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Any

import psutil

from benchmarks.signing import Signer, make_signer
from src import constants

PROJECT_DIR = constants.PROJECT_DIR
_MAJOR, _MINOR, _PATCH = (int(p) for p in constants.VERSION.root.split("-")[0].split("."))
BASE = constants.VERSION.root
GOOD = f"{_MAJOR}.{_MINOR + 1}.0"
BROKEN_TESTS = f"{_MAJOR}.{_MINOR + 2}.0"
# the dev checkout's PDM and uv (`bash .ci/setup dev`)
TOOLS = os.path.join(PROJECT_DIR, ".pdm-venv")

# faults that show only on a station, under the guard of a version trial
# (IVY_GUARDED_BY is set), so that the release passes its version_change tests
_IN_PRODUCTION = '\n\nif __import__("os").environ.get("IVY_GUARDED_BY"):\n'
CRASHES_AT_IMPORT = f"{_MAJOR}.{_MINOR + 3}.0"
PROCEDURE_CRASH_LOOPS = f"{_MAJOR}.{_MINOR + 4}.0"
HANGS = f"{_MAJOR}.{_MINOR + 5}.0"
NEVER_CONNECTS = f"{_MAJOR}.{_MINOR + 6}.0"

_FAILING_GATE = """import pytest

pytestmark = pytest.mark.version_change


def test_this_release_is_broken_on_purpose() -> None:
    assert False, "release broken on purpose"
"""


_RELEASES: dict[str, dict[str, str]] = {
    GOOD: {},
    BROKEN_TESTS: {"tests/test_zz_broken_release.py": _FAILING_GATE},
    CRASHES_AT_IMPORT: {
        "src/main.py": _IN_PRODUCTION
        + '    raise ImportError("this release cannot import its main loop")\n'
    },
    PROCEDURE_CRASH_LOOPS: {
        "src/procedures/dummy_procedure.py": _IN_PRODUCTION
        + "    def _crash(config: Config, name: str) -> None:\n"
        + '        raise RuntimeError("this release\'s procedure cannot start")\n\n'
        + "    info = ProcedureInfo(run=_crash, config_model=DummyProcedureConfig)\n"
    },
    HANGS: {
        "src/main.py": _IN_PRODUCTION
        + "    def run(config: Config | None = None) -> str | None:  # noqa: F811\n"
        + "        while True:\n"
        + "            time.sleep(1)\n"
    },
    NEVER_CONNECTS: {
        "src/backend/thingsboard_backend.py": _IN_PRODUCTION
        + "    def run(  # noqa: F811\n"
        + "        config: Config, name: str, teardown_indicator: Event\n"
        + "    ) -> None:\n"
        + "        teardown_indicator.wait()\n\n"
        + "    info = BackendInfo(run=run)\n"
    },
}


def git(*args: str, cwd: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


def set_version(directory: str, current: str, version: str) -> None:
    for name, old, new in (
        ("pyproject.toml", f'version = "{current}"', f'version = "{version}"'),
        (
            "config/config.template.json",
            f'"software_version": "{current}"',
            f'"software_version": "{version}"',
        ),
    ):
        path = os.path.join(directory, name)
        with open(path) as f:
            content = f.read()
        if old not in content:
            raise RuntimeError(f"{name} does not hold {old}")
        with open(path, "w") as f:
            f.write(content.replace(old, new, 1))


@dataclass
class Releases:
    """A git repository with tags v<BASE> (this checkout) and one per entry
    of `_RELEASES`: the same tree, bumped, plus the entry's additions
    (GOOD: none; BROKEN_TESTS: a failing version_change test; the others a
    fault that shows only under a version trial's guard). Every tag is signed
    by `release_key`; stations set up from it trust `release_key` for
    releases and `config_key` for configs."""

    repository: str
    release_key: Signer
    config_key: Signer

    def tarball(self, version: str, extra: dict[str, bytes] | None = None) -> bytes:
        """The release as GitLab serves it (one top-level directory), plus
        `extra` members."""
        archived = subprocess.run(
            ["git", "archive", "--format=tar", "--prefix=ivy-v0123abcd/", f"v{version}"],
            cwd=self.repository,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        buffer = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(archived)) as source,
            tarfile.open(fileobj=buffer, mode="w:gz") as tar,
        ):
            for member in source.getmembers():
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
            for name, content in (extra or {}).items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()


def copy_checkout(destination: str) -> None:
    """Copy this checkout's files (tracked and new, as git sees them; not the
    station's own config) into `destination`."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in files:
        source = os.path.join(PROJECT_DIR, name)
        if name and name != "config/config.json" and os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))


def make_releases(repository: str) -> Releases:
    """The repository of `Releases` at `repository` (a new directory)."""
    if not os.access(os.path.join(TOOLS, "bin", "uv"), os.X_OK):
        raise RuntimeError(f"{TOOLS} lacks uv: run `bash .ci/setup dev`")
    copy_checkout(repository)
    keys = repository.rstrip("/") + "-keys"
    release_key, config_key = make_signer(keys, "release-manager"), make_signer(keys, "operator")
    git("init", "--quiet", cwd=repository)
    git("add", "-A", cwd=repository)
    git("commit", "--quiet", "-m", BASE, cwd=repository)
    sign_tag(repository, f"v{BASE}", release_key)
    for version, additions in _RELEASES.items():
        # each release is the base tree, bumped, plus its own additions
        git("reset", "--quiet", "--hard", f"v{BASE}", cwd=repository)
        set_version(repository, BASE, version)
        for path, text in additions.items():
            mode = (
                "a"
                if path.endswith(".py") and os.path.exists(os.path.join(repository, path))
                else "w"
            )
            with open(os.path.join(repository, path), mode) as f:
                f.write(text)
        git("add", "-A", cwd=repository)
        git("commit", "--quiet", "-m", version, cwd=repository)
        sign_tag(repository, f"v{version}", release_key)
    return Releases(repository, release_key, config_key)


def sign_tag(repository: str, tag: str, signer: Signer, target: str = "HEAD") -> None:
    """An annotated tag of `target` signed with an OpenSSH key, as `git tag -s`
    with `gpg.format ssh` makes it (replacing a tag of that name)."""
    git(
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={signer.private}",
        "tag",
        "-s",
        "-f",
        "-m",
        tag,
        tag,
        target,
        cwd=repository,
    )


@dataclass
class ProductionStation:
    """A root made by `ivy setup`, driven through its CLI pointer."""

    root: str
    env: dict[str, str]
    releases: Releases
    setup_output: str = ""

    @property
    def pointer(self) -> str:
        return os.path.join(self.root, "ivy-cli.sh")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.pointer, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def pointed_version(self) -> str:
        with open(self.pointer) as f:
            return f.read().split(self.root + "/", 1)[1].split("/", 1)[0]

    def processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                if self.root + "/" in cmdline and p.info["status"] != "zombie":
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def running_versions(self) -> set[str]:
        """The versions whose code the station's processes run."""
        return {
            " ".join(p.cmdline()).split(self.root + "/", 1)[1].split("/", 1)[0]
            for p in self.processes()
        }

    def state(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.root, "data", "state.json")) as f:
                result: dict[str, Any] = json.load(f)
                return result
        except (OSError, ValueError):
            return {}

    def config_file(self, name: str, version: str, revision: int, **changes: Any) -> str:
        config = station_config(self.releases, version, revision)
        config.update(changes)
        path = os.path.join(os.path.dirname(self.root), name)
        with open(path, "w") as f:
            json.dump(config, f)
        return path


def station_config(releases: Releases, version: str, revision: int) -> dict[str, Any]:
    with open(os.path.join(PROJECT_DIR, "config", "config.template.json")) as f:
        config: dict[str, Any] = json.load(f)
    config["general"]["software_version"] = version
    config["general"]["config_revision"] = revision
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"] = None
    config["updater"] = {"source": "git", "repository": releases.repository}
    config["trial"] = {"deadline_seconds": 60, "stable_seconds": 1, "max_starts": 3}
    return config


def setup_environment(package_cache: str) -> dict[str, str]:
    """The environment of `ivy setup` and of the station it makes: no IVY_
    variables of the caller's, PDM and uv from the dev checkout, uv's cache at
    `package_cache`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IVY_")}
    env.update({"IVY_TOOLS_DIR": TOOLS, "UV_CACHE_DIR": package_cache, "PYTHONUNBUFFERED": "1"})
    return env


def setup_command(
    cli_py: str, root: str, repository: str, version: str, config_path: str, *options: str
) -> list[str]:
    """`ivy setup` of `version` from the git repository, with `options`."""
    return [
        sys.executable,
        cli_py,
        "setup",
        "--root",
        root,
        "--source",
        "git",
        "--repository",
        repository,
        "--version",
        version,
        "--config",
        config_path,
        *options,
    ]


def set_up_station(
    root: str, releases: Releases, package_cache: str, **changes: Any
) -> ProductionStation:
    """`ivy setup` of version BASE into `root` with `station_config` (plus
    `changes`), PDM and uv from the dev checkout, uv's cache at `package_cache`."""
    env = setup_environment(package_cache)
    station = ProductionStation(root, env, releases)
    config_path = station.config_file("first-config.json", BASE, 0, **changes)
    result = subprocess.run(
        setup_command(
            os.path.join(PROJECT_DIR, "cli.py"),
            root,
            releases.repository,
            BASE,
            config_path,
            "--config-signers",
            releases.config_key.public,
            "--release-signers",
            releases.release_key.public,
            "--broker-hosts",
            "127.0.0.1,localhost",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ivy setup failed:\n{result.stdout}{result.stderr}")
    station.setup_output = result.stdout
    return station
