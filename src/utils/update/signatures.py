"""Signed configs: the envelope an operator makes with `ivy config sign` and the
station checks with `ssh-keygen -Y verify` (OpenSSH's own signature format, the
keys operators already have), judged by its exit code only.

An envelope is a JSON object with exactly two keys:

    {"signed": "<JSON text of the document>", "signature": "-----BEGIN SSH SIGNATURE-----..."}

The signature covers the exact bytes of `signed`, a document with the config
(or, for a fleet rollout, a JSON merge patch, `"patch": {...}`, merged into
the station's running config; or `"revert": n`, the config the station ran
before revision n), the stations it is for, when it was signed and when it
expires:

    {"format": "ivy-signed-config/1", "config": {...}, "stations": ["id", ...],
     "signed_at": 1764640000.123456, "expires_at": null}

`signed_at` orders an operator's configs: a station takes a signed config only
when it was signed after the last one it handled, whatever its revision, so a
replay is refused and no revision, however large, locks a station out. The
signature's namespace is `ivy-config`; a signature git made for a tag (namespace
`git`) never verifies as a config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import Field

from .admission import parse_json_object
from .trust import CONFIG_NAMESPACE

SIGNED_CONFIG_FORMAT: Literal["ivy-signed-config/1"] = "ivy-signed-config/1"
ENVELOPE_KEYS = frozenset({"signed", "signature"})
_SSH_KEYGEN_TIMEOUT_SECONDS = 20
_MAX_SIGNATURE_CHARS = 16_384
_STATION_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


# how far ahead of the station's clock a signature may say it was made (clocks
# of unsynchronised stations drift); one further ahead waits for the clock
MAX_SIGNED_AHEAD_SECONDS = 86_400.0


class SignatureError(Exception):
    """A signed config cannot be accepted; the message says why (for the
    answer), never with the config in it."""


class SignatureUnchecked(SignatureError):
    """No verdict just now (ssh-keygen too slow on a busy machine, or signed
    more than a day ahead of this station's clock): the config may be judged
    again later."""


class SignedDocument(pydantic.BaseModel):
    """What the signature covers."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    format: Literal["ivy-signed-config/1"]
    config: dict[str, Any] | None = None
    patch: dict[str, Any] | None = None
    # the revision whose predecessor the station is to run again
    revert: int | None = Field(None, ge=0, lt=2**31)
    # the revision the change is to run under, when the signer fixes it (a
    # fleet rollout): the config topic's unsigned revision must agree
    revision: int | None = Field(None, ge=0, lt=2**31)
    stations: list[str] = Field(..., min_length=1, max_length=100_000)
    signed_at: float = Field(..., gt=0, allow_inf_nan=False)
    expires_at: float | None = Field(None, allow_inf_nan=False)

    @pydantic.field_validator("stations")
    @classmethod
    def _station_names(cls, stations: list[str]) -> list[str]:
        for station in stations:
            if not re.match(_STATION_PATTERN, station):
                raise ValueError(f"{station!r} is not a station identifier")
        return stations

    @pydantic.model_validator(mode="after")
    def _one_change(self) -> SignedDocument:
        changes = [c for c in (self.config, self.patch, self.revert) if c is not None]
        if len(changes) != 1:
            raise ValueError("a signed document holds exactly one of config, patch and revert")
        return self


@dataclass(frozen=True)
class VerifiedConfig:
    """A signed document whose signature a config signer made."""

    document: SignedDocument
    signer: str


def is_envelope(raw: Any) -> bool:
    """Whether received JSON data is a signed-config envelope (and not a
    plain config)."""
    return isinstance(raw, dict) and set(raw) == ENVELOPE_KEYS


def _ssh_keygen(arguments: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            ["ssh-keygen", *arguments],
            input=stdin,
            capture_output=True,
            timeout=_SSH_KEYGEN_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        raise SignatureError("ssh-keygen is not installed (package openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise SignatureUnchecked("ssh-keygen took too long to verify the signature") from None


def verify_signature(data: bytes, signature: str, signers_path: str, namespace: str) -> str:
    """The principal of the allowed signer whose key made `signature` over
    `data` in `namespace`; raise `SignatureError` otherwise. Only ssh-keygen's
    exit codes decide: its output is never parsed for a verdict."""
    if not os.path.isfile(signers_path):
        raise SignatureError(f"no signers file {signers_path}: nobody can sign for this station")
    with tempfile.TemporaryDirectory(prefix="ivy-signature-") as directory:
        signature_path = os.path.join(directory, "signature")
        with open(signature_path, "w", encoding="ascii", errors="replace") as f:
            f.write(signature)
        found = _ssh_keygen(
            ["-Y", "find-principals", "-f", signers_path, "-s", signature_path], b""
        )
        if found.returncode != 0:
            raise SignatureError("the signature is not made by a key this station trusts")
        principals = found.stdout.decode("utf-8", errors="replace").split()
        for principal in principals[:16]:
            verified = _ssh_keygen(
                [
                    "-Y",
                    "verify",
                    "-f",
                    signers_path,
                    "-I",
                    principal,
                    "-n",
                    namespace,
                    "-s",
                    signature_path,
                ],
                data,
            )
            if verified.returncode == 0:
                return principal
    raise SignatureError(
        f"the signature does not verify (tampered, or not made for namespace {namespace})"
    )


def verify_envelope(
    envelope: dict[str, Any], signers_path: str, station: str, now: float | None = None
) -> VerifiedConfig:
    """Check a signed-config envelope for this `station`: the signature by a
    config signer, then the document (format, for this station, not expired).
    Raise `SignatureError` with the reason."""
    signed, signature = envelope.get("signed"), envelope.get("signature")
    if not isinstance(signed, str) or not isinstance(signature, str):
        raise SignatureError("signed and signature must be strings")
    if len(signature) > _MAX_SIGNATURE_CHARS:
        raise SignatureError(f"signature: longer than {_MAX_SIGNATURE_CHARS} characters")
    data = signed.encode("utf-8", errors="surrogatepass")
    signer = verify_signature(data, signature, signers_path, CONFIG_NAMESPACE)
    raw, error = parse_json_object(data, "signed")
    if raw is None:
        raise SignatureError(f"{error} (signed by {signer})")
    try:
        document = SignedDocument.model_validate(raw)
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in x['loc']) or 'signed'}: {x['msg']}" for x in e.errors()[:5]
        )
        raise SignatureError(f"the signed document is not one Ivy reads: {problems}") from None
    if station not in document.stations:
        raise SignatureError(
            f"signed for {', '.join(document.stations[:5])}"
            + (" and others" if len(document.stations) > 5 else "")
            + f", not for this station ({station})"
        )
    now = time.time() if now is None else now
    if document.signed_at > now + MAX_SIGNED_AHEAD_SECONDS:
        # taken, it would make every config signed at the right time look
        # like a replay until then: one wrong clock would lock the station out.
        # No verdict either: the station's clock may be the wrong one
        raise SignatureUnchecked(
            f"signed at {_utc(document.signed_at)}, more than a day ahead of this "
            f"station's clock ({_utc(now)}): check the signer's clock (and the station's)"
        )
    if document.expires_at is not None and now > document.expires_at:
        raise SignatureError(
            f"expired at {_utc(document.expires_at)} (signed at {_utc(document.signed_at)})"
        )
    return VerifiedConfig(document, signer)


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def signed_document_text(
    change: dict[str, Any] | int,
    stations: list[str],
    *,
    kind: Literal["config", "patch", "revert"] = "config",
    expires_in_seconds: float | None = None,
    now: float | None = None,
    revision: int | None = None,
) -> str:
    """The document to sign, as JSON text: `change` (a config, a merge patch
    or the revision to revert) for `stations`, signed now, expiring after
    `expires_in_seconds`, to run under `revision` if given."""
    signed_at = time.time() if now is None else now
    document = SignedDocument.model_validate(
        {
            "format": SIGNED_CONFIG_FORMAT,
            "stations": stations,
            "signed_at": round(signed_at, 6),
            "expires_at": None if expires_in_seconds is None else signed_at + expires_in_seconds,
            kind: change,
            "revision": revision,
        }
    )
    return json.dumps(document.model_dump(exclude_none=True), sort_keys=True, ensure_ascii=False)


def sign_text(text: str, key_path: str) -> str:
    """An SSH signature over `text` in the config namespace, made by
    `ssh-keygen -Y sign` with the private key at `key_path` (or the public key
    of a key held by ssh-agent); ssh-keygen asks for a passphrase on the
    terminal if the key has one. Raise `SignatureError` when it fails."""
    with tempfile.TemporaryDirectory(prefix="ivy-sign-") as directory:
        path = os.path.join(directory, "signed")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            result = subprocess.run(
                ["ssh-keygen", "-q", "-Y", "sign", "-f", key_path, "-n", CONFIG_NAMESPACE, path],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=300,
                check=False,
            )
        except FileNotFoundError:
            raise SignatureError("ssh-keygen is not installed (package openssh-client)") from None
        if result.returncode != 0:
            detail = result.stderr.decode("utf-8", errors="replace").strip()[-500:]
            raise SignatureError(f"ssh-keygen could not sign with {key_path}: {detail}")
        with open(path + ".sig", encoding="ascii") as f:
            return f.read()


def envelope(text: str, signature: str) -> dict[str, str]:
    """The envelope that travels where a config goes."""
    return {"signed": text, "signature": signature}
