"""Every contract between versions holds across the restructuring of remote
change: a station set up with the last release before it (main at 344d074,
`tests/fixtures/ivy-main-344d074.tar.gz`, made with `git archive`) updates to
this version through its own, old updater and guard, commits it, and this
version's `ivy rollback` takes it back to the old one, which runs and answers
again. Both read and write the same journal, state, queue and CLI pointer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from typing import Any

import psutil
import pytest
from tum_esm_utils.files import load_toml_file

from benchmarks.production import (
    PROJECT_DIR,
    copy_checkout,
    git,
    set_version,
    setup_command,
    setup_environment,
    sign_tag,
)
from benchmarks.signing import make_signer
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.updater]

OLD = "0.1.0"  # the version 344d074 calls itself
NEW = "0.2.0"
FIXTURE = os.path.join(PROJECT_DIR, "tests", "fixtures", "ivy-main-344d074.tar.gz")


def releases_of_old_and_new(directory: str) -> str:
    """A repository: v<OLD> is the old release's tree, v<NEW> this checkout
    (tracked and new files) with its version bumped; both tags signed."""
    repository = os.path.join(directory, "releases")
    key = make_signer(os.path.join(directory, "keys"), "release-manager")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(directory, filter="data")
    shutil.move(os.path.join(directory, "ivy-344d074"), repository)
    git("init", "--quiet", cwd=repository)
    git("add", "-A", cwd=repository)
    git("commit", "--quiet", "-m", OLD, cwd=repository)
    sign_tag(repository, f"v{OLD}", key)
    for name in os.listdir(repository):
        if name != ".git":
            path = os.path.join(repository, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    copy_checkout(repository)
    current = load_toml_file(os.path.join(repository, "pyproject.toml"))["project"]["version"]
    set_version(repository, current, NEW)
    git("add", "-A", cwd=repository)
    git("commit", "--quiet", "-m", NEW, cwd=repository)
    sign_tag(repository, f"v{NEW}", key)
    return repository


def config_for(repository: str, version: str, revision: int) -> dict[str, Any]:
    with open(os.path.join(PROJECT_DIR, "config", "config.template.json")) as f:
        config: dict[str, Any] = json.load(f)
    config["general"].update(software_version=version, config_revision=revision)
    config["dummy_procedure"]["seconds_between_datapoints"] = 1
    config["system_checks"] = None
    config["updater"] = {"source": "git", "repository": repository}
    config["trial"] = {"deadline_seconds": 60, "stable_seconds": 1, "max_starts": 3}
    return config


def test_the_release_before_the_trust_policy_updates_to_this_one_and_back(
    tmp_path: Any, package_cache: str
) -> None:
    repository = releases_of_old_and_new(str(tmp_path))
    root = str(tmp_path / "root")
    env = setup_environment(package_cache)
    first = tmp_path / "first.json"
    first.write_text(json.dumps(config_for(repository, OLD, 0)))
    old_cli = os.path.join(str(tmp_path), "old-checkout")
    subprocess.run(
        ["git", "clone", "--quiet", "--branch", f"v{OLD}", repository, old_cli], check=True
    )
    set_up = subprocess.run(
        setup_command(os.path.join(old_cli, "cli.py"), root, repository, OLD, str(first)),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert set_up.returncode == 0, set_up.stdout + set_up.stderr
    pointer = os.path.join(root, "ivy-cli.sh")

    def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [pointer, *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def running() -> set[str]:
        """The versions whose code the station's processes run."""
        found = set()
        for process in psutil.process_iter(["cmdline", "status"]):
            command = " ".join(process.info["cmdline"] or [])
            if root + "/" in command and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.add(command.split(root + "/", 1)[1].split("/", 1)[0])
        return found

    try:
        started = cli("start")
        assert started.returncode == 0, started.stdout + started.stderr
        update = tmp_path / "update.json"
        update.write_text(json.dumps(config_for(repository, NEW, 1)))
        applied = cli("config", "apply", str(update), "--wait", "300", timeout=400)
        assert applied.returncode == 0 and "accepted" in applied.stdout, (
            applied.stdout + applied.stderr
        )
        with open(pointer) as f:
            assert f"/{NEW}/" in f.read()
        assert wait_until(lambda: running() == {NEW}, timeout=60), running()
        status = cli("status")
        assert "no trust policy: remote configs and updates are refused" in status.stdout
        journal = json.loads(open(os.path.join(root, "data", "update-journal.json")).read())
        assert (journal["current"], journal["previous"]) == (NEW, OLD)

        rolled = cli("rollback")
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        with open(pointer) as f:
            assert f"/{OLD}/" in f.read()
        assert wait_until(lambda: running() == {OLD}, timeout=60), running()
        journal = json.loads(open(os.path.join(root, "data", "update-journal.json")).read())
        assert journal["current"] == OLD and NEW in journal["bad_versions"]

        def rejected_by_the_old_version() -> bool:
            result = cli("update", "status")
            outcomes = (
                json.loads(result.stdout)["config_outcomes"] if result.returncode == 0 else []
            )
            return any(o["config_revision"] == 1 and o["status"] == "rejected" for o in outcomes)

        assert wait_until(rejected_by_the_old_version, timeout=60)
        assert cli("stop").returncode == 0
    finally:
        subprocess.run([pointer, "stop"], env=env, capture_output=True, timeout=300, check=False)
