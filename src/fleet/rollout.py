"""A change rolled out to many stations in waves that stop on failure.

Each station gets the change signed for it alone (a merge patch, or a revert
for a rollback) as a retained message on its config topic, so that a station
that is away takes it when it returns. A wave is done when every station of
it that was reachable when it was sent has answered (`accepted` means it ran
the change healthily under its trial) or stayed silent past the answer
timeout; unreachable stations are reported, left out of the thresholds, and
not waited for. Failures (rejected, or silent) beyond `max_failures` halt the
rollout; so does `ivy fleet halt`. Halting means no further station starts
the change, and the stations that were sent it and have not answered get
their previous config topic content back."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from src.types.config import is_valid_revision
from src.utils.update.signatures import envelope, sign_text, signed_document_text

from .broker import FleetBroker, FleetBrokerError, Sightings
from .store import RolloutRecord, RolloutState, RolloutStore, Target
from .view import DEFAULT_UNREACHABLE_AFTER_SECONDS, is_reachable

DEFAULT_WAVES = "1,25%,100%"
DEFAULT_ANSWER_TIMEOUT_SECONDS = 900.0
_POLL_SECONDS = 0.5
_FAILED = ("rejected", "no_answer")


class RolloutError(Exception):
    """A rollout cannot start or go on; the message says why."""


def parse_waves(text: str, stations: int) -> list[int]:
    """`1,25%,100%` -> how many stations have started after each wave
    (cumulative, each wave at least one more, the last all of them)."""
    ends: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(%?)", part)
        if match is None or int(match[1]) == 0:
            raise RolloutError(f"--waves: {part!r} is neither a count nor a percentage")
        number = int(match[1])
        end = math.ceil(stations * min(number, 100) / 100) if match[2] else min(number, stations)
        previous = ends[-1] if ends else 0
        if end > previous:
            ends.append(end)
    if not ends or ends[-1] < stations:
        ends.append(stations)
    return ends


@dataclass(frozen=True)
class FailureLimit:
    """Halt once failures exceed `count`, or `percent` of the answers once
    at least `min_answers` have come."""

    count: int | None = None
    percent: float | None = None
    min_answers: int = 1

    @classmethod
    def parse(cls, text: str, min_answers: int = 1) -> FailureLimit:
        """`N` or `P%`."""
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(%?)", text.strip())
        if match is None:
            raise RolloutError(f"--max-failures: {text!r} is neither a count nor a percentage")
        if match[2]:
            return cls(percent=float(match[1]), min_answers=min_answers)
        if "." in match[1]:
            raise RolloutError(f"--max-failures: {text!r}: a count is a whole number")
        return cls(count=int(match[1]), min_answers=min_answers)

    def exceeded(self, failures: int, answers: int) -> bool:
        """Whether these failures among these answers call for a halt."""
        if self.count is not None:
            return failures > self.count
        assert self.percent is not None
        return answers >= self.min_answers and failures * 100 > self.percent * answers


def change_digest(kind: str, change: Any, stations: list[str]) -> str:
    """What identifies a rollout for resuming: the change and its stations."""
    text = json.dumps([kind, change, stations], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def station_payload(
    kind: Literal["patch", "revert"], change: Any, station: str, revision: int, key: str
) -> bytes:
    """The retained message on `configurations/<station>`: Tenta's
    `{"revision", "configuration"}` holding the change signed for it alone."""
    text = signed_document_text(change, [station], kind=kind, revision=revision)
    signed = envelope(text, sign_text(text, key))
    return json.dumps({"revision": revision, "configuration": signed}).encode()


def revisions_in_use(seen: Sightings) -> set[int]:
    """The config revisions a station reports or answered about: a new
    rollout's must be none of them, or an old answer could pass for its."""
    used = {answer.revision for answer in seen.answers}
    if seen.report is not None:
        used.add(seen.report.config_revision or 0)
        if seen.report.last_config is not None:
            used.add(seen.report.last_config.revision)
    return used


# what stations report is not signed: a reported revision this high is not
# followed, so that no report can push the revisions to their end (2**31 - 1)
FOLLOWED_BELOW = 2**30


def next_revision(highest_sent: int, in_use: set[int]) -> int | None:
    """The revision a new rollout signs: one above every revision this tool
    sent and every one in use on a station below `FOLLOWED_BELOW`, and none
    that a station uses (an old answer could pass for one to it). None when
    no revision is left."""
    followed = [r for r in in_use if r < FOLLOWED_BELOW]
    candidate = 1 + max([highest_sent, *followed])
    while candidate in in_use:  # at most len(in_use) steps
        candidate += 1
    return candidate if is_valid_revision(candidate) else None


def answer_of(target: Target, revision: int, seen: Sightings) -> tuple[str, str | None] | None:
    """How a sent station's change ended, if it has: its acknowledgment of
    `revision`, or its state report's newest outcome of it, or its report
    of a refused payload with our digest."""
    report = seen.report
    reason = None
    if report is not None and report.last_config is not None:
        if report.last_config.revision == revision:
            reason = report.last_config.reason
            if report.last_config.status in ("accepted", "rejected"):
                return report.last_config.status, reason
    for answer in seen.answers:
        if answer.revision == revision:
            return ("accepted", None) if answer.success else ("rejected", reason)
    if report is not None and report.last_refused is not None:
        if report.last_refused.digest == target.digest:
            return "rejected", report.last_refused.reason
    return None


Progress = Callable[[str], None]


class Rollout:
    """Runs (or resumes) one stored rollout through a connected broker."""

    def __init__(
        self,
        store: RolloutStore,
        record: RolloutRecord,
        broker: FleetBroker,
        key: str,
        progress: Progress,
        *,
        answer_timeout: float = DEFAULT_ANSWER_TIMEOUT_SECONDS,
        unreachable_after: float = DEFAULT_UNREACHABLE_AFTER_SECONDS,
    ) -> None:
        """Prepare; nothing is sent before `run`."""
        self.store = store
        self.record = record
        self.broker = broker
        self.key = key
        self.progress = progress
        self.answer_timeout = answer_timeout
        self.unreachable_after = unreachable_after
        plan = record.plan
        self.limit = FailureLimit(
            count=plan.get("max_failures_count"),
            percent=plan.get("max_failures_percent"),
            min_answers=plan.get("min_answers", 1),
        )

    def run(self) -> RolloutState:
        """Send wave by wave, wait for the answers, halt on failure or on
        `ivy fleet halt`; return the final state."""
        waves = max((t.wave for t in self.store.targets(self.record.id)), default=-1) + 1
        self._resend_lost_sends()
        for wave in range(waves):
            if self.store.state(self.record.id) != "running":
                break
            members = [t for t in self.store.targets(self.record.id) if t.wave == wave]
            self.progress(f"wave {wave + 1}/{waves}: {len(members)} station(s)")
            if not self._send_wave(wave, members) or not self._wait_for_wave(wave):
                break
        if self.store.state(self.record.id) == "running":
            self._collect_answers()
            self.store.finish(self.record.id)
        return self.store.state(self.record.id)

    def _send_wave(self, wave: int, members: list[Target]) -> bool:
        """Send the wave's stations; for each that is unreachable, the next
        waiting station joins this wave, so that a wave (the canary above
        all) has its planned number of stations that can answer. False when
        the rollout halted meanwhile."""
        for target in members:
            if target.status == "waiting" and not self._send(target):
                return False
        sizes = self.record.plan.get("wave_sizes")
        planned = sizes[wave] if isinstance(sizes, list) and wave < len(sizes) else len(members)
        while True:
            targets = self.store.targets(self.record.id)
            reachable = [t for t in targets if t.wave == wave and t.reachable_at_send is not False]
            later = [t for t in targets if t.wave > wave and t.status == "waiting"]
            if len(reachable) >= planned or not later:
                return True
            self.store.move_to_wave(self.record.id, later[0].station, wave)
            self.progress(f"  {later[0].station} joins this wave in place of an unreachable one")
            if not self._send(later[0]):
                return False

    def _resend_lost_sends(self) -> None:
        """A rollout killed between recording a send and the broker's
        confirmation may not have sent it: whatever its config topic does not
        hold goes out again (the same signed payload), unless a halt came."""
        for target in self.store.targets(self.record.id):
            if target.status != "sent" or target.sent_payload is None:
                continue
            if self.broker.seen(target.station).retained_config == target.sent_payload:
                continue
            if self.store.state(self.record.id) != "running":
                return
            self.broker.publish_config(target.station, target.sent_payload)
            self.progress(f"  sent to {target.station} again (the last send may be lost)")
            if self.store.state(self.record.id) != "running":
                # a halt came while it was on its way: put it back too
                restore(self.broker, self.store, self.record.id, target)
                return

    def halt(self, reason: str) -> None:
        """Halt now: see the module's docstring."""
        self.progress(f"halting: {reason}")
        for target in self.store.halt(self.record.id, reason):
            restore(self.broker, self.store, self.record.id, target)

    def _send(self, target: Target) -> bool:
        seen = self.broker.seen(target.station)
        payload = station_payload(
            self.record.kind, self.record.change, target.station, self.record.revision, self.key
        )
        reachable = is_reachable(seen, self.unreachable_after)
        if not self.store.mark_sent(
            self.record.id,
            target.station,
            previous_payload=seen.retained_config,
            sent_payload=payload,
            digest=hashlib.sha256(payload).hexdigest(),
            reachable=reachable,
        ):
            # halted, or sent already by another process running this rollout
            return self.store.state(self.record.id) == "running"
        self.broker.publish_config(target.station, payload)
        self.progress(
            f"  sent to {target.station}"
            + ("" if reachable else " (unreachable: it takes the change when it returns)")
        )
        if self.store.state(self.record.id) != "running":
            # a halt came in while this one was on its way: put it back too
            sent = [t for t in self.store.targets(self.record.id) if t.station == target.station]
            restore(self.broker, self.store, self.record.id, sent[0])
            return False
        return True

    def _collect_answers(self) -> list[Target]:
        """Record the answers that came for any sent station; return the
        targets as they are now."""
        now = time.time()
        targets = self.store.targets(self.record.id)
        answered = sum(1 for t in targets if t.status in ("accepted", *_FAILED))
        for target in targets:
            if target.status != "sent":
                continue
            seen = self.broker.seen(target.station)
            answer = answer_of(target, self.record.revision, seen)
            if answer is not None:
                status, reason = answer
                self.store.answer(self.record.id, target.station, status, reason)  # type: ignore[arg-type]
                answered += 1
                self.progress(
                    f"  {target.station}: {status}"
                    + (f" after {now - (target.sent_at or now):.0f} s" if target.sent_at else "")
                    + (f" ({reason})" if reason else "")
                    + f" [{answered}/{len(targets)} answered]"
                )
            elif target.reachable_at_send and now - (target.sent_at or now) > self.answer_timeout:
                self.store.answer(
                    self.record.id,
                    target.station,
                    "no_answer",
                    f"no answer within {self.answer_timeout:.0f} s",
                )
                answered += 1
                self.progress(
                    f"  {target.station}: no answer within {self.answer_timeout:.0f} s "
                    f"[{answered}/{len(targets)} answered]"
                )
        return self.store.targets(self.record.id)

    def _wait_for_wave(self, wave: int) -> bool:
        """Wait until every station of `wave` that was reachable when sent has
        answered; False when the rollout halted."""
        while True:
            if self.store.state(self.record.id) != "running":
                return False
            targets = self._collect_answers()
            failures = sum(1 for t in targets if t.status in _FAILED)
            answers = failures + sum(1 for t in targets if t.status == "accepted")
            if self.limit.exceeded(failures, answers):
                self.halt(f"{failures} of {answers} answer(s) failed")
                return False
            if not self.broker.connected.is_set():
                self.progress("  the broker connection is down; waiting for it")
            waiting = [
                t for t in targets if t.wave == wave and t.status == "sent" and t.reachable_at_send
            ]
            if not waiting:
                return True
            time.sleep(_POLL_SECONDS)


def restore(broker: FleetBroker, store: RolloutStore, rollout: int, target: Target) -> None:
    """Put back what was on a sent station's config topic before (or clear
    it when there was nothing), unless the station answered meanwhile."""
    try:
        broker.publish_config(target.station, target.previous_payload or b"")
    except FleetBrokerError as e:
        raise RolloutError(f"could not put {target.station}'s previous config back: {e}") from None
    store.withdrawn(rollout, target.station)
