"""Signed configs with the real `ssh-keygen`: a good signature passes; one
flipped byte, a key outside the signers, a git signature replayed as a config,
another station's config and an expired one are each refused; a replay of an
older signed config is told from a retained copy of the newest."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from benchmarks.signing import Signer, make_signer
from src.types import ForeignConfig, State
from src.types.state import PendingConfig
from src.utils.update.admission import is_new, is_replay
from src.utils.update.signatures import (
    SignatureError,
    SignatureUnchecked,
    is_envelope,
    verify_envelope,
)
from src.utils.update.trust import (
    CONFIG_NAMESPACE,
    RELEASE_NAMESPACE,
    TrustError,
    allowed_signers_from,
)
from tests.conftest import template_config_dict

pytestmark = pytest.mark.quick

STATION = "station-1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Signer]:
    directory = str(tmp_path_factory.mktemp("keys"))
    return {name: make_signer(directory, name) for name in ("operator", "stranger")}


@pytest.fixture
def signers_file(tmp_path: Any, keys: dict[str, Signer]) -> str:
    path = str(tmp_path / "config-signers")
    with open(path, "w") as f:
        f.write(allowed_signers_from(keys["operator"].public_key(), CONFIG_NAMESPACE, "test"))
    return path


def config() -> dict[str, Any]:
    raw = template_config_dict()
    raw["general"]["system_identifier"] = STATION
    return raw


def test_a_good_signature_passes_and_names_its_signer(
    keys: dict[str, Signer], signers_file: str
) -> None:
    envelope = keys["operator"].sign(config())
    assert is_envelope(envelope) and not is_envelope(config())
    verified = verify_envelope(envelope, signers_file, STATION)
    assert verified.signer == "operator"
    assert verified.document.config == config()
    assert verified.document.stations == [STATION]


def flip(text: str, position: int) -> str:
    character = "A" if text[position] != "A" else "B"
    return text[:position] + character + text[position + 1 :]


def test_one_flipped_byte_in_the_config_or_the_signature_is_refused(
    keys: dict[str, Signer], signers_file: str
) -> None:
    envelope = keys["operator"].sign(config())
    tampered = dict(envelope, signed=envelope["signed"].replace(": 10}", ": 11}", 1))
    assert tampered["signed"] != envelope["signed"]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(tampered, signers_file, STATION)
    lines = envelope["signature"].splitlines()
    lines[2] = flip(lines[2], 10)
    broken = dict(envelope, signature="\n".join(lines) + "\n")
    with pytest.raises(SignatureError):
        verify_envelope(broken, signers_file, STATION)


def test_a_key_outside_the_signers_is_refused(keys: dict[str, Signer], signers_file: str) -> None:
    with pytest.raises(SignatureError, match="not made by a key this station trusts"):
        verify_envelope(keys["stranger"].sign(config()), signers_file, STATION)


def test_a_git_signature_is_never_a_config_signature(
    keys: dict[str, Signer], signers_file: str, tmp_path: Any
) -> None:
    """The same key and bytes, signed in git's namespace (as a tag is)."""
    text = keys["operator"].sign(config())["signed"]
    path = tmp_path / "document"
    path.write_text(text)
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-f", keys["operator"].private, "-n", "git", str(path)],
        check=True,
        capture_output=True,
    )
    replayed = {"signed": text, "signature": (tmp_path / "document.sig").read_text()}
    with pytest.raises(SignatureError, match="namespace ivy-config"):
        verify_envelope(replayed, signers_file, STATION)
    # and the signers file limits each key to its namespace as well
    with open(signers_file) as f:
        assert f'namespaces="{CONFIG_NAMESPACE}"' in f.read()


def test_a_config_for_another_station_is_refused(
    keys: dict[str, Signer], signers_file: str
) -> None:
    envelope = keys["operator"].sign(config(), stations=["station-2", "station-3"])
    with pytest.raises(SignatureError, match="not for this station"):
        verify_envelope(envelope, signers_file, STATION)
    assert verify_envelope(envelope, signers_file, "station-3").signer == "operator"


def test_an_expired_config_is_refused(keys: dict[str, Signer], signers_file: str) -> None:
    envelope = keys["operator"].sign(config(), expires_in_seconds=60, now=1_000_000.0)
    with pytest.raises(SignatureError, match="expired at 1970-01-12"):
        verify_envelope(envelope, signers_file, STATION, now=1_000_061.0)
    assert verify_envelope(envelope, signers_file, STATION, now=1_000_059.0).signer


def test_a_config_signed_ahead_of_the_stations_clock_is_refused(
    keys: dict[str, Signer], signers_file: str
) -> None:
    # taken, a signer's clock set to 2030 would make every config signed at
    # the right time look like a replay until 2030
    envelope = keys["operator"].sign(config(), now=1_900_000_000.0)
    with pytest.raises(SignatureUnchecked, match="more than a day ahead of this station's clock"):
        verify_envelope(envelope, signers_file, STATION, now=1_800_000_000.0)
    # a station whose clock is a few hours behind still takes it
    assert verify_envelope(envelope, signers_file, STATION, now=1_900_000_000.0 - 3 * 3600).signer


def test_a_signed_document_that_is_not_ivys_is_refused(
    keys: dict[str, Signer], signers_file: str, tmp_path: Any
) -> None:
    documents: list[Any] = [
        {"config": {}},
        [1, 2],
        {"format": "ivy-signed-config/1", "stations": []},
    ]
    for document in documents:
        text = json.dumps(document)
        envelope = {"signed": text, "signature": _signature(keys["operator"], text, tmp_path)}
        with pytest.raises(SignatureError):
            verify_envelope(envelope, signers_file, STATION)


def _signature(signer: Signer, text: str, directory: Any) -> str:
    path = os.path.join(str(directory), "doc")
    with open(path, "w") as f:
        f.write(text)
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-f", signer.private, "-n", CONFIG_NAMESPACE, path],
        check=True,
        capture_output=True,
    )
    with open(path + ".sig") as f:
        return f.read()


def test_replays_are_told_from_retained_copies_and_revisions_do_not_matter() -> None:
    def pending(signed_at: float, revision: int) -> PendingConfig:
        raw = config()
        raw["general"]["config_revision"] = revision
        return PendingConfig(
            config=ForeignConfig.model_validate(raw), origin="remote", signed_at=signed_at
        )

    state = State()
    assert is_new(pending(10.0, 5), 0, state)
    state.newest_signed_config_at = 10.0
    state.highest_handled_config_revision = 2**31 - 1  # a huge unsigned revision locks nothing
    assert not is_new(pending(10.0, 5), 0, state) and not is_replay(pending(10.0, 5), state)
    assert not is_new(pending(9.0, 7), 0, state) and is_replay(pending(9.0, 7), state)
    assert is_new(pending(11.0, 3), 9, state)  # signed later: new, whatever its revision


def test_signers_files_take_public_keys_or_allowed_signers_lines(keys: dict[str, Signer]) -> None:
    key = keys["operator"].public_key().strip()
    converted = allowed_signers_from(f"# ops\n{key}\n", RELEASE_NAMESPACE, "f")
    assert converted == f'operator namespaces="git" {" ".join(key.split()[:2])}\n'
    line = f"alice@example.org {key}"
    assert allowed_signers_from(line, CONFIG_NAMESPACE, "f") == line + "\n"
    for bad in ("", "# only a comment\n", "not a key at all\n"):
        with pytest.raises(TrustError):
            allowed_signers_from(bad, CONFIG_NAMESPACE, "f")
