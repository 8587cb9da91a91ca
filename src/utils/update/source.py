"""Fetch a release: exactly the tag `v<version>` of the pinned source, its
signature verified, into `<root>/<version>/`.

1. `git fetch` of `refs/tags/v<version>` alone into a fresh repository in a
   staging directory under the root (a branch of the same name cannot stand
   in for the tag). HTTPS only for GitHub and GitLab; the token travels in a
   header scoped to the source's URL, through git's environment (never in a
   URL, argv or log), and redirects are not followed.
2. Before anything of the new tree is checked out, read or run: the tag must
   be an annotated tag object whose own name is `v<version>` (a validly signed
   tag of another version re-pointed under this name is refused) and `git
   verify-tag` with the release signers (namespace `git`, OpenSSH keys only)
   must exit 0. Only the exit code decides: git prints "Good signature" even
   for a key outside the allowed signers.
3. The verified commit is checked out, checked to call itself `<version>` in
   its pyproject.toml, recorded in `<tree>/.ivy-release.json` (tag object,
   commit, signer) and renamed into place in one step.

A version directory that exists already is reused only when its record names
the commit just verified; otherwise it is replaced (never the running version).
Called by the update worker and by `ivy setup`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import tum_esm_utils.files

from src import constants

from ..parent_death import preexec_die_with_this_process
from .paths import staging_prefix, version_directory
from .trust import ReleaseSource, TrustPolicy, release_signers_path

RELEASE_RECORD = ".ivy-release.json"
_GIT_TIMEOUT_SECONDS = 300


class DownloadError(Exception):
    """The source could not be fetched, verified or checked out; the message
    says why (never with a token in it)."""


@dataclass(frozen=True)
class ReleaseRecord:
    """What was verified about a version directory's tree."""

    version: str
    source: str
    tag_object: str
    commit: str
    signer_checked: bool
    verified_at: float


def remove_stale_staging() -> list[str]:
    """Delete staging directories a crash left behind; return their names.
    Called when a main loop starts."""
    if not os.path.isdir(constants.ROOT_DIR):
        return []
    removed = []
    for name in os.listdir(constants.ROOT_DIR):
        if name.startswith(staging_prefix()):
            shutil.rmtree(os.path.join(constants.ROOT_DIR, name), ignore_errors=True)
            removed.append(name)
    return removed


def _token_user(source: ReleaseSource) -> str:
    # GitHub takes any user name with a token; x-access-token is its own
    return {"github": "x-access-token", "gitlab": "oauth2"}.get(source.source, "token")


def git_environment(source: ReleaseSource, token: str | None) -> dict[str, str]:
    """The environment of every git command on the release source: no prompt,
    no system or user hooks and filters, only the protocols the source needs,
    and the token (if any) as a header sent to the source's URL only."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GIT_") or key in ("GIT_SSL_CAINFO", "GIT_SSH_COMMAND")
    }
    environment.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_ALLOW_PROTOCOL": "https" if source.source != "git" else "https:ssh:file",
        }
    )
    settings: dict[str, str] = {
        "http.followRedirects": "false",
        # a transfer that stalls below 1 kB/s for a minute is given up
        "http.lowSpeedLimit": "1000",
        "http.lowSpeedTime": "60",
        "core.hooksPath": os.devnull,
        "protocol.file.allow": "always" if source.source == "git" else "never",
    }
    if token:
        credentials = base64.b64encode(f"{_token_user(source)}:{token}".encode()).decode()
        # scoped to the source's URL: a header for exactly that origin
        settings[f"http.{source.git_url()}.extraHeader"] = f"Authorization: Basic {credentials}"
    environment["GIT_CONFIG_COUNT"] = str(len(settings))
    for index, (key, value) in enumerate(settings.items()):
        environment[f"GIT_CONFIG_KEY_{index}"] = key
        environment[f"GIT_CONFIG_VALUE_{index}"] = value
    return environment


def _git(
    arguments: list[str], repository: str, environment: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", "-C", repository, *arguments],
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_GIT_TIMEOUT_SECONDS,
            check=False,
            # git dies with the update worker (a kill -9 of the main loop leaves
            # no fetch behind); its HTTPS helper ends on the low-speed limit
            preexec_fn=preexec_die_with_this_process(),
        )
    except subprocess.TimeoutExpired:
        raise DownloadError(
            f"git {arguments[0]} took longer than {_GIT_TIMEOUT_SECONDS} s"
        ) from None


def _fetch_tag(
    source: ReleaseSource, token: str | None, tag: str, repository: str
) -> dict[str, str]:
    environment = git_environment(source, token)
    init = _git(["init", "--quiet"], repository, environment)
    if init.returncode != 0:
        raise DownloadError(f"git init failed: {init.stderr.strip()[-500:]}")
    fetched = _git(
        [
            "fetch",
            "--quiet",
            "--no-tags",
            "--depth",
            "1",
            "--",  # the URL can never be taken for an option
            source.git_url(),
            f"+refs/tags/{tag}:refs/tags/{tag}",
        ],
        repository,
        environment,
    )
    if fetched.returncode != 0:
        raise DownloadError(f"git fetch of tag {tag} failed: {fetched.stderr.strip()[-1_000:]}")
    return environment


def _verify_tag(
    policy: TrustPolicy, tag: str, repository: str, environment: Mapping[str, str]
) -> tuple[str, str]:
    """(tag object, commit) of a tag that passed every check; raise otherwise."""
    ref = f"refs/tags/{tag}"
    kind = _git(["cat-file", "-t", ref], repository, environment).stdout.strip()
    signed = not policy.accept_unsigned_releases
    if kind != "tag" and signed:
        raise DownloadError(f"{tag} is a lightweight tag: it carries no signature")
    if kind == "tag":
        header = _git(["cat-file", "tag", ref], repository, environment).stdout
        fields = dict(line.split(" ", 1) for line in header.split("\n\n", 1)[0].splitlines())
        if fields.get("tag") != tag or fields.get("type") != "commit":
            raise DownloadError(
                f"the tag object under {tag} names itself {fields.get('tag')!r} "
                f"(a {fields.get('type')}), not {tag}: refused"
            )
    if signed:
        signers = release_signers_path()
        if not os.path.isfile(signers):
            raise DownloadError(f"no release signers ({signers}): no release can be verified")
        verified = _git(
            [
                "-c",
                "gpg.format=ssh",
                "-c",
                "gpg.ssh.program=ssh-keygen",
                "-c",
                f"gpg.ssh.allowedSignersFile={signers}",
                "-c",
                "gpg.program=false",
                "-c",
                "gpg.x509.program=false",
                "verify-tag",
                ref,
            ],
            repository,
            environment,
        )
        if verified.returncode != 0:
            raise DownloadError(
                f"the signature of tag {tag} does not verify against the release signers "
                f"({signers}): refused before anything of it was read"
            )
    tag_object = _git(["rev-parse", ref], repository, environment).stdout.strip()
    commit = _git(["rev-parse", f"{ref}^{{commit}}"], repository, environment).stdout.strip()
    if not commit:
        raise DownloadError(f"{tag} does not point at a commit")
    return tag_object, commit


def read_release_record(directory: str) -> ReleaseRecord | None:
    """The verification record of a version directory, or None."""
    try:
        with open(os.path.join(directory, RELEASE_RECORD), encoding="utf-8") as f:
            return ReleaseRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def fetch_release(
    policy: TrustPolicy,
    version: str,
    token: str | None,
    log_progress: Callable[[str], None],
) -> str:
    """Fetch, verify and check out tag `v<version>` of the pinned source into
    `<root>/<version>` and return that path; raise `DownloadError` with the
    reason. The staging directory goes whatever happens."""
    source = policy.release_source
    if source is None:
        raise DownloadError("the trust policy pins no release source: no version can be fetched")
    tag = f"v{version}"
    os.makedirs(constants.ROOT_DIR, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{staging_prefix()}{version}-", dir=constants.ROOT_DIR)
    try:
        tree = os.path.join(staging, "tree")
        os.makedirs(tree)
        log_progress(f"fetching tag {tag} of {source.git_url()}")
        environment = _fetch_tag(source, token, tag, tree)
        tag_object, commit = _verify_tag(policy, tag, tree, environment)
        log_progress(
            f"tag {tag} verified ({commit[:12]})"
            if not policy.accept_unsigned_releases
            else f"tag {tag} fetched UNVERIFIED (the trust policy accepts unsigned releases)"
        )
        checkout = _git(
            ["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit],
            tree,
            environment,
        )
        if checkout.returncode != 0:
            raise DownloadError(f"git checkout failed: {checkout.stderr.strip()[-1_000:]}")
        shutil.rmtree(os.path.join(tree, ".git"))
        _check_version(tree, version)
        record = ReleaseRecord(
            version=version,
            source=source.git_url(),
            tag_object=tag_object,
            commit=commit,
            signer_checked=not policy.accept_unsigned_releases,
            verified_at=time.time(),
        )
        with open(os.path.join(tree, RELEASE_RECORD), "w", encoding="utf-8") as f:
            json.dump(asdict(record), f, indent=2)
        return _move_into_place(tree, version, record, log_progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(
    tree: str, version: str, record: ReleaseRecord, log_progress: Callable[[str], None]
) -> str:
    target = version_directory(version)
    if os.path.isdir(target):
        existing = read_release_record(target)
        if existing is not None and existing.commit == record.commit and existing.signer_checked:
            log_progress(f"{target} holds this verified commit already; kept")
            return target
        if os.path.realpath(target) == os.path.realpath(constants.PROJECT_DIR):
            raise DownloadError(f"{target} is the running version: not replaced")
        log_progress(f"{target} has no record of this verified commit; replacing it")
        shutil.rmtree(target)
    os.replace(tree, target)
    log_progress(f"release {version} ({record.commit[:12]}) is in {target}")
    return target


def _check_version(source: str, version: str) -> None:
    path = os.path.join(source, "pyproject.toml")
    try:
        found = tum_esm_utils.files.load_toml_file(path)["project"]["version"]
    except (OSError, KeyError, ValueError) as e:
        raise DownloadError(f"the source has no readable pyproject.toml ({e})") from None
    if found != version:
        raise DownloadError(f"the source of tag v{version} says it is version {found}")
