"""Configs arriving over MQTT, judged in the backend process before anything
else sees them. Whatever arrives is hostile, and so is whoever sent it: MQTT
says nothing about the sender. So, in this order:

1. its size and nesting are bounded before it is parsed (by the provider);
2. the station's trust policy decides: a signed envelope is verified against
   the config signers (`ssh-keygen -Y verify`, by exit code), for this
   station, not expired, and signed after the newest config handled (older:
   a replay); a plain config passes only where the policy names the opt-out
   `accept_unsigned_configs`; without a policy nothing passes;
3. only then is it read as a config (revision and version, strictly) and
   queued for the main loop's updater, which applies the policy's limits.

A config that fails 1 or 2 changes nothing in the state and is answered with
the reason and a digest of what arrived, never the config, at a bounded rate.
A verified config that is invalid is answered like any rejection. A config
handled already (a retained copy after a reconnect) is ignored, logged once."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import pydantic

from src.types import Config, ConfigMessageBody, ForeignConfig
from src.types.config import format_validation_error, general_field_of, revision_of
from src.types.state import PendingConfig
from src.utils.logger import Logger
from src.utils.merge_patch import merge_patch
from src.utils.messaging_agent import MessagingAgent
from src.utils.state_interface import StateInterface
from src.utils.update.admission import (
    config_revision_is_new,
    is_new,
    is_replay,
    mark_revision,
    mark_signed_handled,
    queue_pending_config,
)
from src.utils.update.answers import UnverifiedAnswers, record_config_outcome
from src.utils.update.config_history import config_before
from src.utils.update.signatures import (
    SignatureError,
    SignatureUnchecked,
    SignedDocument,
    is_envelope,
    verify_envelope,
)
from src.utils.update.trust import TrustError, config_signers_path, load_policy

from .provider import ReceivedConfig

_ANSWERED_KEPT = 256
_DEFERRED_KEPT = 4
_DEFERRED_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class Admitted:
    """A received config the trust policy lets in: signed by a config signer
    (`signed_at`, `signer`), or unsigned where the policy opts out."""

    config: dict[str, Any]
    signed_at: float | None = None
    signer: str | None = None
    revision: int | None = None  # signed with the change
    patch: dict[str, Any] | None = None  # the signed merge patch the config came from


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _with_revision(config: dict[str, Any], revision: int | None) -> dict[str, Any]:
    """`config` with the server's revision (Tenta's) as its own."""
    if revision is None:
        return config
    general = config.get("general")
    return {
        **config,
        "general": {**(general if isinstance(general, dict) else {}), "config_revision": revision},
    }


class ConfigReceiver:
    """Judge configs on arrival: reject, ignore, or queue them for the updater.
    Used by the backend process only."""

    def __init__(self, config: Config, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Remember the running revision and the station's identifier."""
        self.running = config
        self.current_revision = config.general.config_revision
        self.station = config.general.system_identifier
        self.logger = logger
        self.messaging_agent = messaging_agent
        self.unverified = UnverifiedAnswers(logger, messaging_agent)
        self.answered: list[str] = []  # digests answered by this process
        self.ignored: set[str] = set()  # digests whose ignoring was logged
        # configs that could not be judged yet (the station's clock behind the
        # signer's, ssh-keygen starved of CPU), by digest, judged again later
        self.deferred: dict[str, tuple[ReceivedConfig, bytes]] = {}
        self.deferred_retry_at = 0.0

    def handle(self, received: ReceivedConfig, payload: bytes) -> None:
        """Reject, ignore or queue one received config (`payload`: the MQTT
        message it came in)."""
        digest = hashlib.sha256(payload).hexdigest()
        if digest in self.answered:
            return  # the same message again (a retained one after a reconnect)
        claimed = received.server_revision
        if claimed is None:
            claimed = revision_of(received.config)
        if received.error is not None:
            self._reject_unverified(received.error, digest, claimed)
            return
        try:
            admitted = self._admit(received.config)
        except SignatureUnchecked as e:
            # neither refused nor remembered: judged again in a while
            if digest not in self.deferred:
                self.logger.warning(f"a received config cannot be judged yet: {e}")
                self.deferred[digest] = (received, payload)
                while len(self.deferred) > _DEFERRED_KEPT:  # a flood: the newest stay
                    del self.deferred[next(iter(self.deferred))]
            return
        except SignatureError as e:
            self.deferred.pop(digest, None)
            self._reject_unverified(str(e), digest, claimed)
            return
        self.deferred.pop(digest, None)
        if admitted.revision is not None and received.server_revision not in (
            None,
            admitted.revision,
        ):
            # the topic's revision is not signed: whoever changed it is not the signer
            self._reject_unverified(
                f"revision: the message says {received.server_revision}, the signed change "
                f"says {admitted.revision}",
                digest,
                claimed,
            )
            return
        revision = admitted.revision if admitted.revision is not None else received.server_revision
        config = _with_revision(admitted.config, revision)
        try:
            foreign = ForeignConfig.model_validate(config)
        except pydantic.ValidationError as e:
            self._reject_invalid(
                admitted, config, format_validation_error(e, "received config"), digest
            )
            return
        pending = PendingConfig(
            config=foreign,
            origin="remote",
            digest=digest,
            signed_at=admitted.signed_at,
            signer=admitted.signer,
            patch=admitted.patch,
        )
        state = StateInterface.load()
        if is_replay(pending, state):
            reason = (
                f"replayed: signed at {_utc(pending.signed_at or 0)}, before the newest config "
                f"this station handled (signed at {_utc(state.newest_signed_config_at or 0)})"
            )
            self._reject_unverified(reason, digest, claimed)
            return
        if not is_new(pending, self.current_revision, state):
            self._ignore(digest, foreign.general.config_revision)
            return
        if queue_pending_config(pending):
            self.logger.info(
                f"received config revision {foreign.general.config_revision}"
                + (f", signed by {pending.signer}" if pending.signer else " (unsigned)")
                + "; queued for the updater"
            )

    def _admit(self, raw: Any) -> Admitted:
        """What the trust policy lets in of `raw`; raise `SignatureError` with
        the reason for anything else."""
        try:
            policy = load_policy()
        except TrustError as e:
            raise SignatureError(f"the trust policy cannot be read: {e}") from None
        if policy is None:
            raise SignatureError(
                "this station has no trust policy, so it takes no remote config "
                "(set one up on the station with `ivy trust set`)"
            )
        if is_envelope(raw):
            verified = verify_envelope(raw, config_signers_path(), self.station)
            document = verified.document
            return Admitted(
                self._requested_config(document),
                document.signed_at,
                verified.signer,
                document.revision,
                document.patch,
            )
        if policy.accept_unsigned_configs:
            return Admitted(raw)
        raise SignatureError(
            "unsigned: this station takes only configs signed by a key in its trust policy "
            "(sign one with `ivy config sign`)"
        )

    def _requested_config(self, document: SignedDocument) -> dict[str, Any]:
        """The config a verified document asks for: its config; the running
        config with its merge patch applied; or the config that ran before
        the revision it reverts (`SignatureError` when none is kept)."""
        if document.config is not None:
            return document.config
        if document.patch is not None:
            running = json.loads(self.running.to_json(reveal_secrets=True))
            merged = merge_patch(running, document.patch)
            return merged if isinstance(merged, dict) else {}
        assert document.revert is not None
        before = config_before(document.revert)
        if before is None:
            raise SignatureError(
                f"revert: this station keeps no config from before revision {document.revert}"
            )
        return before

    def _ignore(self, digest: str, revision: int) -> None:
        if digest not in self.ignored:
            if len(self.ignored) >= _ANSWERED_KEPT:  # a flood: stay bounded
                self.ignored.clear()
            self.ignored.add(digest)
            self.logger.info(f"ignoring config revision {revision}: handled already")

    def _reject_invalid(
        self, admitted: Admitted, config: dict[str, Any], reason: str, digest: str
    ) -> None:
        """A config the policy let in that is not a config: answered like any
        rejection, and remembered so that it is not answered again."""
        revision = revision_of(config)
        if admitted.signed_at is not None:
            mark_signed_handled(admitted.signed_at)
        elif revision is not None:
            if not config_revision_is_new(revision, self.current_revision, StateInterface.load()):
                self._ignore(digest, revision)  # an old broken config still retained
                return
            mark_revision(revision, accepted=False)
        else:
            reason = f"no valid revision could be read, so this answer carries none; {reason}"
        self._remember(digest)
        if revision is not None:
            version = general_field_of(config, "software_version")
            record_config_outcome(
                revision, version if isinstance(version, str) else "?", "rejected", reason
            )
        self.logger.warning(f"rejected a received config (revision {revision})", details=reason)
        self.messaging_agent.add_message(
            ConfigMessageBody.about("rejected", config, reason, digest=digest)
        )

    def retry_deferred(self) -> None:
        """Judge again, once a minute, the configs that could not be judged
        yet. Called by the drain loop on every turn."""
        now = time.monotonic()
        if not self.deferred or now < self.deferred_retry_at:
            return
        self.deferred_retry_at = now + _DEFERRED_RETRY_SECONDS
        for received, payload in list(self.deferred.values()):
            self.handle(received, payload)  # judged: it leaves `deferred`

    def _remember(self, digest: str) -> None:
        self.answered = [*self.answered[-(_ANSWERED_KEPT - 1) :], digest]

    def _reject_unverified(self, reason: str, digest: str, claimed: Any) -> None:
        self._remember(digest)
        self.unverified.reject(reason, digest, claimed)
