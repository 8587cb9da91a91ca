"""Operator keys and trust policies for tests and benchmarks: real OpenSSH keys
made with `ssh-keygen`, configs signed the way `ivy config sign` signs them,
and a station's `<root>/trust/` written as `ivy trust set` writes it."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Literal

from src.utils.update.signatures import envelope, sign_text, signed_document_text
from src.utils.update.trust import (
    CONFIG_NAMESPACE,
    RELEASE_NAMESPACE,
    ReleaseSource,
    TrustPolicy,
    allowed_signers_from,
    write_trust,
)


@dataclass(frozen=True)
class Signer:
    """An OpenSSH key pair: `private` signs, `public` goes into a station's
    trust policy."""

    private: str
    public: str

    def public_key(self) -> str:
        with open(self.public) as f:
            return f.read()

    def sign(
        self,
        config: dict[str, Any],
        stations: list[str] | None = None,
        expires_in_seconds: float | None = None,
        now: float | None = None,
    ) -> dict[str, str]:
        """The envelope of `config` for `stations` (default: its own
        `general.system_identifier`)."""
        targets = stations or [config["general"]["system_identifier"]]
        text = signed_document_text(config, targets, expires_in_seconds=expires_in_seconds, now=now)
        return envelope(text, sign_text(text, self.private))

    def sign_change(
        self, change: dict[str, Any] | int, stations: list[str], kind: Literal["patch", "revert"]
    ) -> dict[str, str]:
        """The envelope of a merge patch or a revert for `stations`."""
        text = signed_document_text(change, stations, kind=kind)
        return envelope(text, sign_text(text, self.private))

    def sign_text(self, config: dict[str, Any], **options: Any) -> str:
        """`sign` as the JSON text that travels."""
        return json.dumps(self.sign(config, **options))


def make_signer(directory: str, name: str = "operator") -> Signer:
    """A new ed25519 key pair in `directory` (no passphrase), commented `name`."""
    os.makedirs(directory, exist_ok=True)
    private = os.path.join(directory, name)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", private],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Signer(private, private + ".pub")


def trust_station(
    root: str,
    config_signers: list[Signer],
    release_signers: list[Signer] | None = None,
    release_source: dict[str, Any] | None = None,
    **policy: Any,
) -> None:
    """Write `<root>/trust/` for these signers; `policy` sets the other
    fields (broker_hosts defaults to any host)."""
    policy.setdefault("broker_hosts", ["*"])
    write_trust(
        TrustPolicy(
            release_source=ReleaseSource.model_validate(release_source) if release_source else None,
            **policy,
        ),
        allowed_signers_from(
            "".join(s.public_key() for s in config_signers), CONFIG_NAMESPACE, "config signers"
        )
        if config_signers
        else None,
        allowed_signers_from(
            "".join(s.public_key() for s in release_signers), RELEASE_NAMESPACE, "release signers"
        )
        if release_signers
        else None,
        directory=os.path.join(root, "trust"),
    )
