"""Fetching a release, from real git repositories made here (and one served
over HTTPS with a token, as GitHub and GitLab serve them): a correctly signed
tag passes; a tag signed by an unknown key, a lightweight tag, a branch
shadowing the tag name, a re-pointed tag and an unsigned one are refused.
Every refused tree holds a `cli.py`, a `conftest.py`, a `.pdm-python` and a
build backend that would write a marker file: no marker ever appears, because
nothing of a refused tree is checked out, read or run."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from benchmarks.production import git, sign_tag
from benchmarks.signing import make_signer, trust_station
from src import constants
from src.utils.update.source import (
    RELEASE_RECORD,
    DownloadError,
    fetch_release,
    read_release_record,
    remove_stale_staging,
)
from src.utils.update.trust import TrustPolicy, load_policy
from tests.git_server import GitServerState, git_https_server
from tests.mqtt_helpers import make_certificates

pytestmark = [pytest.mark.updater, pytest.mark.integration]

TOKEN = "glpat-secret-token-123"


def hostile_files(marker: str) -> dict[str, str]:
    """What an attacker's release holds: code that writes `marker` from every
    place a tool might run it."""
    write = f"open({marker!r}, 'a').write(__file__ + '\\n')\n"
    return {
        "cli.py": write,
        "conftest.py": write,
        "run.py": write,
        ".pdm-python": marker + "-interpreter\n",
        "backend_hook.py": write + "def build_wheel(*a, **k):\n    return ''\n",
        "pyproject.toml": '[project]\nname = "ivy"\nversion = "{version}"\n'
        '[build-system]\nrequires = []\nbuild-backend = "backend_hook"\nbackend-path = ["."]\n',
    }


def commit_tree(repository: str, version: str, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = os.path.join(repository, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content.replace("{version}", version))
    git("add", "-A", cwd=repository)
    git("commit", "--quiet", "--allow-empty", "-m", version, cwd=repository)


class Releases:
    """A repository with good and hostile releases, and the root to install into."""

    def __init__(self, tmp_path: Any) -> None:
        keys = str(tmp_path / "keys")
        self.release_key = make_signer(keys, "release-manager")
        self.stranger = make_signer(keys, "stranger")
        self.config_key = make_signer(keys, "operator")
        self.marker = str(tmp_path / "MARKER-attacker-code-ran")
        self.repository = str(tmp_path / "releases")
        os.makedirs(self.repository)
        git("init", "--quiet", cwd=self.repository)
        good = {"pyproject.toml": '[project]\nname = "ivy"\nversion = "{version}"\n'}
        commit_tree(self.repository, "1.0.0", good)
        sign_tag(self.repository, "v1.0.0", self.release_key)
        self.good_commit = self.rev("HEAD")
        evil = hostile_files(self.marker)
        commit_tree(self.repository, "1.1.0", evil)
        sign_tag(self.repository, "v1.1.0", self.stranger)  # unknown key
        commit_tree(self.repository, "1.2.0", evil)
        git("tag", "v1.2.0", cwd=self.repository)  # lightweight
        commit_tree(self.repository, "1.3.0", evil)
        git("tag", "-a", "-m", "v1.3.0", "v1.3.0", cwd=self.repository)  # annotated, unsigned
        commit_tree(self.repository, "1.4.0", evil)
        git("branch", "v1.4.0", cwd=self.repository)  # a branch where the tag should be
        # a validly signed tag object of 1.0.0, re-pointed under another name
        tag_object = self.rev("refs/tags/v1.0.0")
        git("update-ref", "refs/tags/v1.5.0", tag_object, cwd=self.repository)
        self.root = str(tmp_path / "root")

    def rev(self, ref: str) -> str:
        return subprocess.run(
            ["git", "rev-parse", ref], cwd=self.repository, capture_output=True, text=True
        ).stdout.strip()

    def trust(self, repository: str | None = None, **policy: Any) -> TrustPolicy:
        source = {"source": "git", "repository": repository or self.repository}
        trust_station(
            self.root, [self.config_key], [self.release_key], release_source=source, **policy
        )
        loaded = load_policy()
        assert loaded is not None
        return loaded


@pytest.fixture
def releases(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Releases:
    made = Releases(tmp_path)
    monkeypatch.setattr(constants, "ROOT_DIR", made.root)
    return made


def nothing_of(releases: Releases, version: str) -> None:
    assert not os.path.exists(releases.marker)
    assert not os.path.exists(os.path.join(releases.root, version))
    assert [n for n in os.listdir(releases.root) if n.startswith(".staging")] == []


def test_a_signed_tag_is_fetched_verified_recorded_and_reused(releases: Releases) -> None:
    policy = releases.trust()
    progress: list[str] = []
    target = fetch_release(policy, "1.0.0", None, progress.append)
    assert target == os.path.join(releases.root, "1.0.0")
    assert not os.path.exists(os.path.join(target, ".git"))
    record = read_release_record(target)
    assert record is not None and record.commit == releases.good_commit and record.signer_checked
    assert any("tag v1.0.0 verified" in line for line in progress)
    assert fetch_release(policy, "1.0.0", None, progress.append) == target
    assert progress[-1].endswith("holds this verified commit already; kept")
    # a directory whose record does not name the verified commit is not reused
    with open(os.path.join(target, RELEASE_RECORD), "w") as f:
        json.dump({"commit": "0" * 40}, f)
    with open(os.path.join(target, "planted.py"), "w") as f:
        f.write("x = 1\n")
    fetch_release(policy, "1.0.0", None, progress.append)
    assert not os.path.exists(os.path.join(target, "planted.py"))
    assert read_release_record(target) is not None


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("1.1.0", "does not verify against the release signers"),
        ("1.2.0", "is a lightweight tag"),
        ("1.3.0", "does not verify against the release signers"),
        ("1.4.0", "git fetch of tag v1.4.0 failed"),
        ("1.5.0", "names itself 'v1.0.0'"),
    ],
    ids=["unknown-key", "lightweight", "unsigned", "branch-shadows-tag", "re-pointed-tag"],
)
def test_a_release_that_is_not_signed_by_a_release_signer_is_refused_unread(
    releases: Releases, version: str, reason: str
) -> None:
    policy = releases.trust()
    with pytest.raises(DownloadError, match=reason):
        fetch_release(policy, version, None, print)
    nothing_of(releases, version)


def test_a_branch_beside_a_signed_tag_of_the_same_name_is_never_what_is_fetched(
    releases: Releases,
) -> None:
    git("branch", "-f", "v1.0.0", "v1.4.0", cwd=releases.repository)
    target = fetch_release(releases.trust(), "1.0.0", None, print)
    assert not os.path.exists(os.path.join(target, "cli.py"))  # the tag's tree, not the branch's
    assert not os.path.exists(releases.marker)


def test_a_tag_moved_after_install_is_fetched_again_and_refused(releases: Releases) -> None:
    policy = releases.trust()
    fetch_release(policy, "1.0.0", None, print)
    commit_tree(releases.repository, "1.0.0", hostile_files(releases.marker))
    git("tag", "-f", "-a", "-m", "v1.0.0", "v1.0.0", cwd=releases.repository)  # moved, unsigned
    with pytest.raises(DownloadError, match="does not verify"):
        fetch_release(policy, "1.0.0", None, print)
    assert not os.path.exists(releases.marker)


def test_the_unsigned_opt_out_takes_a_lightweight_tag_and_records_it_unverified(
    releases: Releases,
) -> None:
    target = fetch_release(releases.trust(accept_unsigned_releases=True), "1.2.0", None, print)
    record = read_release_record(target)
    assert record is not None and not record.signer_checked


def test_a_crash_leaves_staging_that_the_next_start_removes(releases: Releases) -> None:
    os.makedirs(os.path.join(releases.root, ".staging-1.2.3-abc", "tree"))
    os.makedirs(os.path.join(releases.root, "1.0.0"))
    assert remove_stale_staging() == [".staging-1.2.3-abc"]
    assert sorted(os.listdir(releases.root)) == ["1.0.0"]


@pytest.fixture
def certificates(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    made = make_certificates(str(tmp_path / "certs"))
    monkeypatch.setenv("GIT_SSL_CAINFO", made["ca"])  # git trusts the test CA
    return made


def test_over_https_the_token_goes_in_a_header_to_the_source_only(
    releases: Releases, certificates: dict[str, str], tmp_path: Any
) -> None:
    served = str(tmp_path / "served")
    os.makedirs(os.path.join(served, "group"))
    subprocess.run(
        ["git", "clone", "--quiet", "--bare", releases.repository, f"{served}/group/ivy.git"],
        check=True,
    )
    state = GitServerState(served, token=TOKEN)
    with git_https_server(state, certificates["cert"], certificates["key"]) as port:
        releases.trust()
        source = {"source": "gitlab", "repository": "group/ivy", "host": f"localhost:{port}"}
        trust_station(
            releases.root,
            [releases.config_key],
            [releases.release_key],
            release_source=source,
        )
        policy = load_policy()
        assert policy is not None
        progress: list[str] = []
        fetch_release(policy, "1.0.0", TOKEN, progress.append)
        assert os.path.isdir(os.path.join(releases.root, "1.0.0"))
        assert state.seen and all(TOKEN not in path for path, _ in state.seen)
        assert all(authorization is not None for _, authorization in state.seen[1:])
        assert all(TOKEN not in line for line in progress)

        with pytest.raises(DownloadError) as refused:
            fetch_release(policy, "1.1.0", "wrong-token-456", print)
        assert "wrong-token-456" not in str(refused.value)
        with pytest.raises(DownloadError, match="does not verify"):
            fetch_release(policy, "1.1.0", TOKEN, print)
        nothing_of(releases, "1.1.0")

        # a source that redirects elsewhere: not followed, the token not sent there
        elsewhere = GitServerState(served)
        with git_https_server(elsewhere, certificates["cert"], certificates["key"]) as other:
            state.redirect_to = f"https://localhost:{other}"
            with pytest.raises(DownloadError, match=r"git fetch of tag v1\.3\.0 failed"):
                fetch_release(policy, "1.3.0", TOKEN, print)
        assert elsewhere.seen == []
