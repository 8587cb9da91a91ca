"""Which configs get in: the bounds on what is parsed at all, the rule that
says whether a config is new (not handled already), and the queue of pending
configs the main loop's updater works through. Used by the backends on arrival,
by `ivy config apply`, and by the updater.

Freshness: a signed config is new when it was signed after the newest signed
config this station handled (its revision does not matter, so a huge one
locks nobody out). An unsigned config (a local `ivy config apply`, or a
station whose trust policy opts out of signatures) is new when its revision is
at least the running one, higher than the last accepted one, and not rejected
already. Only configs that passed verification ever touch this memory: an
unverified config cannot make a later one look handled."""

from __future__ import annotations

import json
import re
from typing import Any

from src.types import State
from src.types.state import PendingConfig

from ..state_interface import StateInterface

# larger configs are refused unparsed (the backend's and `ivy config apply`'s bound)
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_NESTING = 32
_REJECTED_REVISIONS_KEPT = 32
_MAX_PENDING_CONFIGS = 16
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting_exceeds(payload: bytes, limit: int) -> bool:
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', payload)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def parse_json_object(payload: bytes, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from received bytes, or a clear error naming `what`.
    Payloads larger than `MAX_CONFIG_BYTES` or nested deeper than
    `MAX_CONFIG_NESTING` are refused unparsed."""
    if len(payload) > MAX_CONFIG_BYTES:
        return None, (
            f"{what}: {len(payload)} bytes, more than the {MAX_CONFIG_BYTES} accepted; not parsed"
        )
    if _nesting_exceeds(payload, MAX_CONFIG_NESTING):
        return None, f"{what}: nested deeper than {MAX_CONFIG_NESTING} levels; not parsed"
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, f"{what}: not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"{what}: expected a JSON object, got {_json_type(value)}"
    return value, None


def config_revision_is_new(revision: int, current_revision: int, state: State) -> bool:
    """The rule for unsigned configs: at least the running revision, higher
    than the last accepted one (a station that has accepted none takes its
    current revision, e.g. Tenta's first, 0), and not rejected already."""
    handled = state.highest_handled_config_revision
    return (
        revision >= current_revision
        and (handled is None or revision > handled)
        and revision not in state.rejected_config_revisions
    )


def is_new(pending: PendingConfig, current_revision: int, state: State) -> bool:
    """Whether `pending` is to be judged (see the module's freshness rule)."""
    if pending.signed_at is not None:
        newest = state.newest_signed_config_at
        return newest is None or pending.signed_at > newest
    return config_revision_is_new(pending.config.general.config_revision, current_revision, state)


def is_replay(pending: PendingConfig, state: State) -> bool:
    """Whether a signed config was signed before the newest one handled: an
    old config sent again, not a retained copy of the newest."""
    newest = state.newest_signed_config_at
    return pending.signed_at is not None and newest is not None and pending.signed_at < newest


def mark_revision(revision: int, accepted: bool) -> None:
    """Remember an unsigned config's revision as accepted (later ones only are
    new) or rejected (only this one is blocked, never later ones)."""
    with StateInterface.update() as state:
        if accepted:
            state.highest_handled_config_revision = max(
                revision, state.highest_handled_config_revision or revision
            )
        elif revision not in state.rejected_config_revisions:
            state.rejected_config_revisions = [
                *state.rejected_config_revisions[-(_REJECTED_REVISIONS_KEPT - 1) :],
                revision,
            ]


def mark_handled(pending: PendingConfig, accepted: bool) -> None:
    """Remember that `pending` was accepted or rejected, so that a copy
    arriving again (a retained config after a reconnect) is not judged again:
    a signed config by its signature time, an unsigned one by its revision."""
    if pending.signed_at is None:
        mark_revision(pending.config.general.config_revision, accepted)
    else:
        mark_signed_handled(pending.signed_at)


def mark_signed_handled(signed_at: float) -> None:
    """Remember that the signed config signed at `signed_at` was handled
    (accepted or rejected): only configs signed later are new."""
    with StateInterface.update() as state:
        state.newest_signed_config_at = max(signed_at, state.newest_signed_config_at or signed_at)


def queue_pending_config(pending: PendingConfig) -> bool:
    """Put a config in the state for the main loop's updater, unless the same
    one waits already (same signature time, or same revision when unsigned);
    return whether it was queued. At most the newest 16 wait, so a flood
    cannot grow the state file."""
    with StateInterface.update() as state:
        if any(_same(p, pending) for p in state.pending):
            return False
        state.pending = [*state.pending[-(_MAX_PENDING_CONFIGS - 1) :], pending]
    return True


def _same(a: PendingConfig, b: PendingConfig) -> bool:
    if a.signed_at is not None or b.signed_at is not None:
        return a.signed_at == b.signed_at
    return a.config.general.config_revision == b.config.general.config_revision


def take_pending_configs() -> list[PendingConfig]:
    """Every waiting config, in the order to judge them (oldest signature
    first, then by revision), removing them from the state. Configs queued by
    a version before the trust policy (`pending_configs`) count as local."""
    if not StateInterface.load().pending and not StateInterface.load().pending_configs:
        return []
    with StateInterface.update() as state:
        taken = [
            *state.pending,
            *(PendingConfig(config=c, origin="local") for c in state.pending_configs),
        ]
        state.pending = []
        state.pending_configs = []
    return sorted(
        taken,
        key=lambda p: (
            p.signed_at is None,
            p.signed_at or 0.0,
            p.config.general.config_revision,
        ),
    )


def put_back(configs: list[PendingConfig]) -> None:
    """Queue configs taken but not judged yet in front of any that arrived
    meanwhile. Called by the updater when one config starts a restart or an
    update and the rest must wait for it."""
    if configs:
        with StateInterface.update() as state:
            state.pending = [*configs, *state.pending]
