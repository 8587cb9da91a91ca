"""`ivy config apply FILE`: a config file given on the station itself, queued
for the updater exactly as a remote config would be. Local access is trusted
already, so a plain file needs no signature; a signed envelope is verified all
the same (and then ordered by its signature time). Called by the CLI only."""

from __future__ import annotations

import hashlib
import json

from src.types import Config, ConfigError, ForeignConfig
from src.types.state import PendingConfig

from ..state_interface import StateInterface
from .admission import MAX_CONFIG_BYTES, is_new, parse_json_object, queue_pending_config
from .signatures import SignatureError, is_envelope, verify_envelope
from .trust import config_signers_path


class LocalConfigRefused(Exception):
    """The file is not a config that can be applied now; the message says why
    (it names the file or the field)."""


def queue_local_config(path: str, running: Config) -> PendingConfig:
    """Read the config file at `path` (a plain config or a signed envelope),
    check that it is new, queue it for the updater and return it; raise
    `LocalConfigRefused` with the reason otherwise."""
    try:
        with open(path, "rb") as f:
            content = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise LocalConfigRefused(f"{path}: {e.strerror}") from None
    raw, error = parse_json_object(content, path)
    if raw is None:
        raise LocalConfigRefused(str(error))
    signed_at: float | None = None
    signer: str | None = None
    if is_envelope(raw):
        try:
            verified = verify_envelope(
                raw, config_signers_path(), running.general.system_identifier
            )
        except SignatureError as e:
            raise LocalConfigRefused(f"{path}: {e}") from None
        if verified.document.config is None:
            raise LocalConfigRefused(f"{path}: a signed patch is applied by `ivy fleet`")
        raw = verified.document.config
        signed_at, signer = verified.document.signed_at, verified.signer
    try:
        foreign = ForeignConfig.load_from_string(json.dumps(raw))
    except ConfigError as e:
        raise LocalConfigRefused(f"{path}: {e}") from None
    pending = PendingConfig(
        config=foreign,
        origin="local",
        digest=hashlib.sha256(content).hexdigest(),
        signed_at=signed_at,
        signer=signer,
    )
    revision = foreign.general.config_revision
    state = StateInterface.load()
    if not is_new(pending, running.general.config_revision, state):
        if signed_at is not None:
            raise LocalConfigRefused(
                f"{path}: signed before the newest signed config this station handled"
            )
        raise LocalConfigRefused(
            f"general.config_revision: {revision} is not newer than the last handled "
            f"({state.highest_handled_config_revision}) or the running "
            f"({running.general.config_revision}) revision, or was rejected already"
        )
    queue_pending_config(pending)
    return pending
