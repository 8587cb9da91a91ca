"""The station's trust policy: who may change it over the network, and how far.

Nothing that arrives over the network chooses code to run or whom to trust.
The policy lives in `<root>/trust/`, is written by `ivy setup` and `ivy trust
set` (local commands) and is only ever read by the station:

- `config-signers`, `release-signers`: OpenSSH `allowed_signers` files, the
  keys whose signatures make a config (namespace `ivy-config`) or a release
  tag (namespace `git`) acceptable. A signature made for one namespace never
  verifies in the other.
- `policy.json`: the pinned release source (a remote config cannot name
  another repository), the broker hosts a remote config may point a backend
  at, whether it may turn TLS off, whether it may ask for an older version,
  and the named opt-outs `accept_unsigned_configs` / `accept_unsigned_releases`.

A station without a policy takes no remote config at all. Keys are never
rotated remotely: a stolen config key must not be able to replace the keys
that would revoke it (TUF keeps root keys offline for the same reason); list
the next key beside the current one and change the files locally."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any, Literal

import pydantic
from pydantic import Field

from src.types.atomic_file import write_atomically
from src.types.config import format_validation_error
from src.types.legacy_config import is_ivy_1_1_config, translate_ivy_1_1

from .paths import trust_directory

POLICY_FILE = "policy.json"
CONFIG_SIGNERS_FILE = "config-signers"
RELEASE_SIGNERS_FILE = "release-signers"
# ssh-keygen -Y namespaces: git signs and verifies tags in "git"
CONFIG_NAMESPACE = "ivy-config"
RELEASE_NAMESPACE = "git"
ANY_HOST = "*"

_HOST_PATTERN = r"^(\*|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:]{2,39})$"
_HOST_AND_PORT_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:[0-9]{1,5})?$"
_KEY_TYPES = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-\S+)$")


class TrustError(Exception):
    """The trust policy is missing what is asked of it, or cannot be read; the
    message says what and how to fix it."""


class ReleaseSource(pydantic.BaseModel):
    """Where new versions come from: exactly the tag `v<version>` of this
    repository, over git (HTTPS for GitHub and GitLab, the token in a header)."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    source: Literal["git", "github", "gitlab"]
    repository: str = Field(..., pattern=r"^\S{1,512}$")
    host: str | None = Field(None, pattern=_HOST_AND_PORT_PATTERN)

    @pydantic.model_validator(mode="after")
    def _safe_location(self) -> ReleaseSource:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@", self.repository):
            raise ValueError("credentials in the URL are refused: the token goes in a header")
        if self.repository.lower().startswith(("http://", "git://")):
            raise ValueError("an unencrypted URL is refused: use https:// (or ssh, or a path)")
        if self.source != "git" and not re.match(r"^[\w.-]+(/[\w.-]+)+$", self.repository):
            raise ValueError(f"repository: {self.source} expects owner/name")
        return self

    def git_url(self) -> str:
        """The URL (or path) git fetches from."""
        if self.source == "git":
            return self.repository
        host = self.host or ("github.com" if self.source == "github" else "gitlab.com")
        return f"https://{host}/{self.repository}.git"

    def named_by(self, section: Any) -> bool:
        """Whether a config's `updater` section names this source (its
        `source`, `repository` and `host`; other keys do not matter)."""
        if not isinstance(section, dict):
            return False
        return (
            section.get("source") == self.source
            and section.get("repository") == self.repository
            and section.get("host") == self.host
        )


class TrustPolicy(pydantic.BaseModel):
    """`<root>/trust/policy.json`."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    accept_unsigned_configs: bool = Field(
        False,
        description="Named opt-out: anyone who can publish on the config topic can change "
        "(and, through an update, run code on) this station.",
    )
    accept_unsigned_releases: bool = Field(
        False, description="Named opt-out: release tags are installed without a signature."
    )
    release_source: ReleaseSource | None = Field(
        None, description="The pinned source of new versions; null: no remote version changes."
    )
    broker_hosts: list[str] = Field(
        default_factory=list,
        description='Broker hosts a remote config may point a backend at ("*": any).',
    )
    allow_tls_off: bool = Field(
        False, description="Whether a remote config may turn TLS (or its hostname check) off."
    )
    allow_downgrades: bool = Field(
        False, description="Whether a remote config may ask for an older version."
    )

    @pydantic.field_validator("broker_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not re.match(_HOST_PATTERN, host):
                raise ValueError(f"{host!r} is not a host name, an address or *")
        return hosts


def policy_path() -> str:
    """`<root>/trust/policy.json`."""
    return os.path.join(trust_directory(), POLICY_FILE)


def config_signers_path() -> str:
    """`<root>/trust/config-signers` (allowed_signers format)."""
    return os.path.join(trust_directory(), CONFIG_SIGNERS_FILE)


def release_signers_path() -> str:
    """`<root>/trust/release-signers` (allowed_signers format)."""
    return os.path.join(trust_directory(), RELEASE_SIGNERS_FILE)


def load_policy() -> TrustPolicy | None:
    """The policy, or None when this station has none. Raise `TrustError`
    when it exists but cannot be read: a broken policy trusts nobody."""
    try:
        with open(policy_path(), encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TrustError(f"{policy_path()}: cannot be read ({e.strerror})") from None
    try:
        return TrustPolicy.model_validate_json(content)
    except pydantic.ValidationError as e:
        raise TrustError(format_validation_error(e, policy_path())) from None


def has_signers(path: str) -> bool:
    """Whether an allowed_signers file exists and names at least one key."""
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.strip() and not line.startswith("#") for line in f)
    except OSError:
        return False


def _public_key_line(fields: list[str]) -> bool:
    if len(fields) < 2 or not _KEY_TYPES.match(fields[0]):
        return False
    try:
        base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def allowed_signers_from(text: str, namespace: str, what: str) -> str:
    """The `allowed_signers` file for `text`, which holds either lines of that
    format (kept as they are) or OpenSSH public keys, one per line (each
    becomes a signer named after its comment, limited to `namespace`). Raise
    `TrustError` naming the line that is neither, or when there is no key."""
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if _public_key_line(fields):
            principal = fields[2] if len(fields) > 2 else f"signer-{number}"
            lines.append(f'{principal} namespaces="{namespace}" {fields[0]} {fields[1]}')
        elif any(_public_key_line(fields[i:]) for i in (1, 2)):
            lines.append(stripped)
        else:
            raise TrustError(
                f"{what}, line {number}: neither an OpenSSH public key nor an allowed_signers line"
            )
    if not lines:
        raise TrustError(f"{what}: no key in it")
    return "\n".join(lines) + "\n"


def write_trust(
    policy: TrustPolicy,
    config_signers: str | None = None,
    release_signers: str | None = None,
    directory: str | None = None,
) -> None:
    """Write the policy (and the signers files given) into `directory`
    (`<root>/trust/`), atomically, readable by owner and group only. Called by
    `ivy setup` and `ivy trust set` (local commands), and by tests that set up
    a station."""
    directory = directory or trust_directory()
    os.makedirs(directory, mode=0o750, exist_ok=True)
    os.chmod(directory, 0o750)  # noqa: S103 - the station's group reads; nobody writes
    files = {
        CONFIG_SIGNERS_FILE: config_signers,
        RELEASE_SIGNERS_FILE: release_signers,
        POLICY_FILE: json.dumps(policy.model_dump(mode="json"), indent=2) + "\n",
    }
    for name, content in files.items():
        if content is not None:
            write_atomically(os.path.join(directory, name), content, mode=0o640)


def _backends_of(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, section) of every backend a raw config names."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(raw.get("backend"), dict):
        found.append(("backend", raw["backend"]))
    backends = raw.get("backends")
    if isinstance(backends, dict):
        found += [(f"backends.{n}", s) for n, s in backends.items() if isinstance(s, dict)]
    return found


def _addresses_of(where: str, section: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, address) of a backend's primary address and its failovers."""
    found = [(where, section)]
    failover = section.get("failover")
    if isinstance(failover, list):
        found += [
            (f"{where}.failover.{i}", a) for i, a in enumerate(failover) if isinstance(a, dict)
        ]
    return found


def _host_key(host: Any) -> str:
    """A broker host as DNS compares it (case, a trailing dot)."""
    return str(host).lower().rstrip(".")


def _tls_strength(section: dict[str, Any]) -> int:
    tls = section.get("tls")
    if not isinstance(tls, dict):
        return 0
    return 1 if tls.get("check_hostname") is False else 2


def remote_config_problem(
    policy: TrustPolicy, running: dict[str, Any], received: dict[str, Any]
) -> str | None:
    """What the policy does not let a remote config change, in words naming
    the field and the value (None: nothing). `running` and `received` are raw
    configs; the rules: backends only on allowed broker hosts, TLS (and its
    hostname check) kept unless `allow_tls_off`, and an `updater` section, if
    any, naming the pinned release source. Configs in Ivy 1.1's format are
    judged as they will be read."""
    if is_ivy_1_1_config(received):
        received = translate_ivy_1_1(received).config
    if is_ivy_1_1_config(running):
        running = translate_ivy_1_1(running).config
    hosts = set(policy.broker_hosts)
    running_tls = {where: _tls_strength(s) for where, s in _backends_of(running)}
    # keyed by host too: renaming a destination, or naming the same broker as
    # another one's failover, must not shed the TLS its traffic had
    running_tls_of_host: dict[str, int] = {}
    for where, section in _backends_of(running):
        for _, address in _addresses_of(where, section):
            running_host = _host_key(address.get("mqtt_host"))
            running_tls_of_host[running_host] = max(
                running_tls_of_host.get(running_host, 0), _tls_strength(section)
            )
    for where, section in _backends_of(received):
        for place, address in _addresses_of(where, section):
            host = address.get("mqtt_host")
            if host is not None and ANY_HOST not in hosts and host not in hosts:
                allowed = ", ".join(sorted(hosts)) or "none"
                return (
                    f"{place}.mqtt_host: {json.dumps(host)} is not a broker host this station's "
                    f"trust policy allows ({allowed}); change the policy on the station with "
                    "`ivy trust set --broker-hosts`"
                )
        was = max(
            running_tls.get(where, 0),
            *(
                running_tls_of_host.get(_host_key(address.get("mqtt_host")), 0)
                for _, address in _addresses_of(where, section)
            ),
        )
        if not policy.allow_tls_off and _tls_strength(section) < was:
            return (
                f"{where}.tls: the running config uses TLS"
                + (" with its hostname check" if was == 2 else "")
                + ", and this station's trust policy does not let a remote config turn it off"
            )
    updater = received.get("updater")
    if updater is not None and (
        policy.release_source is None or not policy.release_source.named_by(updater)
    ):
        pinned = policy.release_source
        shown = "none" if pinned is None else f"{pinned.source} {pinned.repository}"
        return (
            f"updater: names a release source other than the one this station's trust policy "
            f"pins ({shown}); a remote config cannot change where versions come from "
            "(leave updater out, or change the policy on the station with `ivy trust set`)"
        )
    return None


def summary(policy: TrustPolicy | None) -> list[str]:
    """What the policy means, a line each, for `ivy status`, `ivy trust show`
    and every start; the opt-outs are said plainly."""
    if policy is None:
        return [
            "no trust policy: remote configs and updates are refused "
            "(set one up with `ivy trust set` or `ivy setup`)"
        ]
    lines = []
    if policy.accept_unsigned_configs:
        lines.append(
            "UNSIGNED CONFIGS ACCEPTED: anyone who can publish on this station's config topic "
            "can change it and run code on it (trust policy: accept_unsigned_configs)"
        )
    else:
        lines.append(f"configs: only those signed by a key in {config_signers_path()}")
    if policy.release_source is None:
        lines.append("releases: no release source is pinned, so no remote version changes")
    elif policy.accept_unsigned_releases:
        lines.append(
            f"UNSIGNED RELEASES ACCEPTED from {policy.release_source.git_url()} "
            "(trust policy: accept_unsigned_releases)"
        )
    else:
        lines.append(
            f"releases: tags of {policy.release_source.git_url()} signed by a key in "
            f"{release_signers_path()}"
        )
    return lines


def policy_problem_text(error: pydantic.ValidationError) -> str:
    """A policy built from command-line options that does not validate."""
    return format_validation_error(error, "the trust policy")
