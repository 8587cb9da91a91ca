"""The station's answers about configs (received, a step done, accepted,
rejected), queued like any message so that they reach the server, and the
outcomes `ivy config apply` and `ivy status` read from the state.

Every reason is masked with the one masking rule. A rejection never carries
the config, only a digest of what arrived. Answers to configs that were never
verified (unsigned, tampered, for another station, replayed, not even JSON)
change nothing in the state and carry no revision, so that a stranger can
neither make a later legitimate revision look handled nor plant the server's
one acknowledgment of it (Tenta stores only the first); they are rate-limited
(`UnverifiedAnswers`), so that a flood cannot fill the disk."""

from __future__ import annotations

import time
from typing import Any, Literal

from src import constants
from src.types import ConfigMessageBody
from src.types.config import mask_secrets, secret_values
from src.types.messages import SoftwareUpdateState
from src.types.state import ConfigOutcome, ConfigRefusal, PendingConfig

from ..logger import Logger
from ..messaging_agent import MessagingAgent
from ..state_interface import StateInterface
from .admission import mark_handled

_OUTCOMES_KEPT = 16
# answers to unverified configs: a burst of this many, then one per interval
_UNVERIFIED_BURST = 10
_UNVERIFIED_INTERVAL_SECONDS = 30.0

AnswerStatus = Literal["received", "progress", "accepted", "rejected"]


def record_config_outcome(
    revision: int, version: str, status: str, reason: str | None = None
) -> None:
    """Remember how a config ended, for `ivy config apply` and `ivy status`
    (the last few only)."""
    outcome = ConfigOutcome(
        config_revision=revision,
        software_version=version,
        status=status,
        reason=reason,
        at=time.time(),
    )
    with StateInterface.update() as state:
        state.config_outcomes = [*state.config_outcomes[-(_OUTCOMES_KEPT - 1) :], outcome]


class Answers:
    """Answers about verified (or local) configs. Used by the updater in the
    main loop and by its update worker."""

    def __init__(self, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Answer through `messaging_agent`, log through `logger`."""
        self.logger = logger
        self.messaging_agent = messaging_agent

    def acknowledge(
        self,
        pending: PendingConfig,
        status: AnswerStatus,
        reason: str | None = None,
        *,
        step: str | None = None,
        step_seconds: float | None = None,
        software_update: SoftwareUpdateState | None = None,
    ) -> None:
        """Queue the answer about `pending` (secrets redacted)."""
        self.messaging_agent.add_message(
            ConfigMessageBody.about(
                status,
                pending.config.to_dict(),
                reason,
                step=step,
                step_seconds=step_seconds,
                software_update=software_update,
                digest=pending.digest or None,
            )
        )

    def reject(self, pending: PendingConfig, reason: str) -> None:
        """Answer `pending` as rejected with `reason` (its secrets masked),
        remember it as handled and its outcome. A config that asked for another
        version also reports the update as failed."""
        revision = pending.config.general.config_revision
        version = pending.config.general.software_version.root
        reason = mask_secrets(reason, secret_values(pending.config.to_dict()))
        mark_handled(pending, accepted=False)
        record_config_outcome(revision, version, "rejected", reason)
        self.logger.warning(f"rejected config revision {revision}", details=reason)
        self.acknowledge(
            pending,
            "rejected",
            reason,
            software_update="FAILED" if version != constants.VERSION.root else None,
        )


class UnverifiedAnswers:
    """Answers to configs that failed verification on arrival: at most a
    burst, then one per interval; the ones left unanswered are counted and
    named in the next answer. Used by the backend process only."""

    def __init__(self, logger: Logger, messaging_agent: MessagingAgent) -> None:
        """Answer through `messaging_agent`, log through `logger`."""
        self.logger = logger
        self.messaging_agent = messaging_agent
        self.tokens = float(_UNVERIFIED_BURST)
        self.refilled = time.monotonic()
        self.unanswered = 0

    def reject(self, reason: str, digest: str, claimed_revision: Any = None) -> bool:
        """Answer one unverified config as rejected, unless the rate limit says
        not now; return whether it was answered."""
        now = time.monotonic()
        self.tokens = min(
            float(_UNVERIFIED_BURST),
            self.tokens + (now - self.refilled) / _UNVERIFIED_INTERVAL_SECONDS,
        )
        self.refilled = now
        if self.tokens < 1:
            self.unanswered += 1
            return False
        self.tokens -= 1
        claimed = (
            f"a config claiming revision {claimed_revision}"
            if isinstance(claimed_revision, int) and not isinstance(claimed_revision, bool)
            else "a config"
        )
        text = f"{claimed} was not accepted (digest {digest[:16]}): {reason}"
        if self.unanswered:
            text += f" ({self.unanswered} more unverified config(s) before it were not answered)"
            self.unanswered = 0
        self.logger.warning("rejected an unverified config", details=text)
        with StateInterface.update() as state:
            state.last_refused_config = ConfigRefusal(digest=digest, reason=text, at=time.time())
        self.messaging_agent.add_message(
            ConfigMessageBody(
                status="rejected",
                config_revision=None,
                software_version=None,
                reason=text,
                digest=digest,
            )
        )
        return True
