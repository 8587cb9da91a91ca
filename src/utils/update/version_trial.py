"""The trial of a new software version, judged by the previous one.

After the switch, the old main loop does not hand over to the new version:
it becomes the *guard* (the same process, the old version's code). The guard
holds the lock, starts the candidate's main loop as its child (which then
takes no lock of its own), and watches it with the health definition of
`health`. Healthy in time: the candidate is stopped cleanly, the journal says
`committed`, the CLI pointer moves to it, and the guard becomes the new
version's main loop through the pointer. Not healthy by the deadline, a crash
loop, a hang, or more than `max_starts` starts: the candidate is stopped, the
journal says `rolling_back`, and the guard becomes the old version's main
loop again; that one rejects the config with the reason. A candidate that
cannot even import its own modules simply exits, and is rolled back.

The journal is edited (under its lock) before every move, so whatever start
comes next (systemd, cron, `ivy start`, after a power loss or a `kill -9` of
guard or candidate) finds where the trial stood and finishes it
(`resolve_at_start`). Called by run.py, the main loop and `ivy rollback`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from types import FrameType
from typing import Any, Literal

import tum_esm_utils.validators

from src import constants
from src.types import ConfigMessageBody, ForeignConfig
from src.types.config import LEGACY_DESTINATION, TrialConfig, secret_values

from ..logger import Logger
from ..messaging_agent import MessagingAgent
from ..parent_death import preexec_die_with_this_process
from ..state_interface import StateInterface
from ..systemd_notify import notify, watchdog
from .admission import mark_revision
from .answers import record_config_outcome
from .commands import output_tail
from .health import HealthWatch, fatal_problem
from .journal import Candidate, PendingAnswer, edit_journal, load_journal
from .paths import candidate_output_path, cli_pointer_path, version_directory
from .steps import update_cli_pointer

GUARD_ENVIRONMENT_VARIABLE = "IVY_GUARDED_BY"
_POLL_SECONDS = 0.5
_STOP_SECONDS = 120.0
_BAD_VERSIONS_KEPT = 32
ROLLBACK_BY_HAND = "rolled back by hand (`ivy rollback`)"

Verdict = Literal["healthy", "exited", "stopped", "unhealthy"]
StartAction = Literal["run", "guard", "exec"]


def is_guarded() -> bool:
    """Whether this process is a candidate's main loop, started by a guard
    that holds the lock for it."""
    return os.environ.get(GUARD_ENVIRONMENT_VARIABLE) == str(os.getppid())


def trial_settings(raw_config: object) -> TrialConfig:
    """The `trial` section of the candidate's config, validated by this
    version's rules; the defaults when it has none or an invalid one."""
    section = raw_config.get("trial") if isinstance(raw_config, dict) else None
    try:
        return TrialConfig.model_validate(section or {})
    except ValueError:
        return TrialConfig()


def start_trial(foreign_config: ForeignConfig) -> None:
    """After every step of an update passed: note the candidate in the journal
    (on trial, with its config's trial settings). The pointer does not move
    yet: the main loop hands over to the guard. Called by the updater."""
    version = foreign_config.general.software_version
    settings = trial_settings(foreign_config.to_dict())
    with edit_journal() as journal:
        journal.current = journal.current or constants.VERSION.root
        journal.candidate = Candidate(
            version=version.root,
            from_version=constants.VERSION.root,
            config_revision=foreign_config.general.config_revision,
            switched_at=time.time(),
            deadline_seconds=settings.deadline_seconds,
            stable_seconds=settings.stable_seconds,
            max_starts=settings.max_starts,
        )


def resolve_at_start() -> StartAction:
    """What a starting main loop process must do about the journal: finish a
    commit or rollback that a power loss cut short and then `exec` the
    pointer if it names another version, resume a trial as its guard, or run."""
    candidate = load_journal().candidate
    if candidate is None:
        return _exec_if_pointer_moved()
    if candidate.phase == "committed":
        _finish_commit(candidate)
        return _exec_if_pointer_moved()
    if candidate.phase == "rolling_back":
        _finish_rollback(candidate, candidate.problem or "rolled back")
        return _exec_if_pointer_moved()
    return "guard"


def _exec_if_pointer_moved() -> Literal["run", "exec"]:
    try:
        with open(cli_pointer_path(), encoding="utf-8") as f:
            names_this_version = f"/{constants.VERSION.root}/" in f.read()
    except OSError:
        return "run"  # a checkout without a production root
    in_root = constants.is_version_directory(constants.PROJECT_DIR)
    return "exec" if (in_root and not names_this_version) else "run"


class Guard:
    """Runs one trial to its end. Created by run.py in the previous version's
    process, which holds the lock."""

    def __init__(self) -> None:
        """Read the candidate from the journal; SIGTERM stops the trial (it
        resumes at the next start)."""
        candidate = load_journal().candidate
        if candidate is None:
            raise RuntimeError("no version is on trial")
        self.candidate: Candidate = candidate
        self.stop_requested = False
        self.process: subprocess.Popen[bytes] | None = None

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def run(self) -> bool:
        """Start, watch and restart the candidate until it is committed or
        rolled back (True), or the guard or the candidate is told to stop
        (False: the trial resumes at the next start)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        with StateInterface.update() as state:
            state.mainloop.guard_pid = os.getpid()
        notify("READY=1")
        try:
            return self._judge()
        finally:
            with StateInterface.update() as state:
                state.mainloop.guard_pid = None

    def _judge(self) -> bool:
        problem = self.candidate.problem or "no start yet"
        while self.candidate.attempts < self.candidate.max_starts:
            self._record(attempts=self.candidate.attempts + 1)
            verdict, problem = self._try_once()
            if verdict == "healthy":
                self._end("committed", problem)
                return True
            if verdict == "stopped":
                return False
            self._record(problem=problem)
            if verdict == "unhealthy":
                break
        else:
            problem = (
                f"started {self.candidate.max_starts} time(s) without becoming healthy: {problem}"
            )
        self._end("rolling_back", problem)
        return True

    def _record(self, **changes: Any) -> None:
        """Change the guard's own fields of the candidate in the journal, keeping
        what others wrote there meanwhile (an `ivy rollback` request)."""
        with edit_journal() as journal:
            candidate = journal.candidate
            if candidate is None or candidate.version != self.candidate.version:
                raise RuntimeError("the candidate left the journal during its trial")
            for field, value in changes.items():
                setattr(candidate, field, value)
            self.candidate = candidate.model_copy()

    def _end(self, phase: Literal["committed", "rolling_back"], problem: str) -> None:
        with edit_journal() as journal:
            candidate = journal.candidate
            if candidate is None:
                raise RuntimeError("the candidate left the journal during its trial")
            candidate.move_to(phase)
            if phase == "rolling_back":
                candidate.problem = problem
            self.candidate = candidate.model_copy()
        if phase == "committed":
            _finish_commit(self.candidate)
        else:
            _finish_rollback(self.candidate, problem)

    def _try_once(self) -> tuple[Verdict, str]:
        candidate = self.candidate
        project = version_directory(candidate.version)
        os.makedirs(constants.LOGS_DIR, exist_ok=True)
        environment = {key: v for key, v in os.environ.items() if key != "NOTIFY_SOCKET"}
        environment[GUARD_ENVIRONMENT_VARIABLE] = str(os.getpid())
        health = HealthWatch(
            StateInterface.load(),
            candidate.stable_seconds,
            destinations_of(_candidate_config(candidate.version)),
        )
        started_monotonic = time.monotonic()  # the deadline: immune to clock steps
        with open(candidate_output_path(candidate.version), "ab") as output:
            self.process = subprocess.Popen(
                [
                    os.path.join(project, ".venv", "bin", "python"),
                    os.path.join(project, "cli.py"),
                    "run",
                ],
                cwd=project,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # a candidate never outlives its guard (a kill -9 of the guard
                # leaves nothing running, and the next start resumes the trial)
                preexec_fn=preexec_die_with_this_process(),
            )
        while True:
            watchdog()
            time.sleep(_POLL_SECONDS)
            if self.stop_requested:
                self._stop_candidate()
                return "stopped", "the guard was told to stop"
            code = self.process.poll()
            if code is not None:
                if code == 0:  # stopped by `ivy stop`: the trial resumes at the next start
                    return "stopped", "the candidate was stopped"
                return "exited", f"its main loop exited with code {code}"
            if _rollback_requested():
                self._stop_candidate()
                return "unhealthy", ROLLBACK_BY_HAND
            state = StateInterface.load()
            problem = health.problem(state)
            if problem is None:
                self._stop_candidate()
                return "healthy", ""
            fatal = fatal_problem(state)
            if (
                fatal is not None
                or time.monotonic() - started_monotonic > candidate.deadline_seconds
            ):
                self._stop_candidate()
                if fatal is not None:
                    return "unhealthy", fatal
                return "unhealthy", (
                    f"not healthy {candidate.deadline_seconds:.0f} s after its start: {problem}"
                )

    def _stop_candidate(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def destinations_of(raw_config: dict[str, Any]) -> list[str]:
    """The destinations a raw config (of any version) names."""
    found = [LEGACY_DESTINATION] if raw_config.get("backend") is not None else []
    backends = raw_config.get("backends")
    return found + (list(backends) if isinstance(backends, dict) else [])


def _rollback_requested() -> bool:
    candidate = load_journal().candidate
    return candidate is not None and candidate.rollback_requested


def _candidate_config(version: str) -> dict[str, Any]:
    try:
        with open(os.path.join(version_directory(version), "config", "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _finish_commit(candidate: Candidate) -> None:
    """Point at the candidate, make it current, keep the one before it as
    previous and remove older versions."""
    update_cli_pointer(tum_esm_utils.validators.Version(candidate.version))
    with edit_journal() as journal:
        journal.previous = candidate.from_version
        journal.current = candidate.version
        journal.candidate = None
        journal.pending_answer = PendingAnswer(
            config_revision=candidate.config_revision,
            software_version=candidate.version,
            status="accepted",
        )
        journal.last_outcome = (
            f"committed {candidate.version} after its trial (start {candidate.attempts} of "
            f"{candidate.max_starts}; from {candidate.from_version}, config revision "
            f"{candidate.config_revision})"
        )
    remove_versions_except({candidate.version, candidate.from_version})


def _finish_rollback(candidate: Candidate, problem: str) -> None:
    """Point back at the previous version, mark the candidate bad and leave
    the rejection for the previous version to send."""
    update_cli_pointer(tum_esm_utils.validators.Version(candidate.from_version))
    with edit_journal() as journal:
        if candidate.version not in journal.bad_versions:
            journal.bad_versions = [
                *journal.bad_versions[-(_BAD_VERSIONS_KEPT - 1) :],
                candidate.version,
            ]
        journal.current = candidate.from_version
        if journal.previous == candidate.from_version:
            journal.previous = None  # the version left behind is marked bad
        journal.candidate = None
        journal.pending_answer = PendingAnswer(
            config_revision=candidate.config_revision,
            software_version=candidate.version,
            status="rejected",
            reason=(
                f"version {candidate.version} was rolled back to {candidate.from_version}: "
                f"{problem}\nits last output:\n{_last_output(candidate.version)}"
            ),
        )
        journal.last_outcome = f"rolled back {candidate.version}: {problem}"


def _last_output(version: str) -> str:
    """The end of the candidate's console output, its config's secrets masked."""
    try:
        with open(candidate_output_path(version), encoding="utf-8", errors="replace") as f:
            text = f.read()[-20_000:]
    except OSError:
        return "(none)"
    masked = output_tail(text, secret_values(_candidate_config(version)))
    return masked[-1_000:] or "(none)"


def remove_versions_except(keep: set[str]) -> list[str]:
    """Remove every version directory under the root but those in `keep`;
    return their names. Called only after a commit."""
    removed = []
    for name in sorted(os.listdir(constants.ROOT_DIR)):
        path = os.path.join(constants.ROOT_DIR, name)
        if constants.is_version_directory(path) and name not in keep and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


class RollbackError(Exception):
    """`ivy rollback` cannot go back; the message says why."""


def request_rollback() -> str | None:
    """During a trial: ask the guard to roll the candidate back and return a
    line saying so; None when no trial runs. Called by `ivy rollback`."""
    with edit_journal() as journal:
        candidate = journal.candidate
        if candidate is None or candidate.phase != "trial":
            return None
        candidate.rollback_requested = True
        return f"asked the guard to roll {candidate.version} back to {candidate.from_version}"


def previous_version() -> str | None:
    """The version `ivy rollback` would go back to: the journal's previous
    one, if it is still installed."""
    previous = load_journal().previous
    if previous is None or not os.path.isfile(
        os.path.join(version_directory(previous), ".venv", "bin", "python")
    ):
        return None
    return previous


def roll_back_by_hand(config_revision: int) -> str:
    """Outside a trial, with the station stopped: point back at the previous
    version, marking this one bad; return the previous version. Raise
    `RollbackError` when there is none to go back to. Called by `ivy rollback`."""
    previous = previous_version()
    if previous is None:
        raise RollbackError("there is no previous version to go back to")
    by_hand = Candidate(
        version=constants.VERSION.root,
        from_version=previous,
        config_revision=config_revision,
        switched_at=time.time(),
        phase="rolling_back",
        problem=ROLLBACK_BY_HAND,
    )
    with edit_journal() as journal:
        journal.candidate = by_hand
    _finish_rollback(by_hand, ROLLBACK_BY_HAND)
    return previous


def deliver_pending_answer(logger: Logger, messaging_agent: MessagingAgent) -> None:
    """At the start of a main loop: send the answer a version trial left in
    the journal (accepted by the committed version, or rejected by the
    previous one after a rollback) and remember the outcome. Called by the
    main loop (never by a candidate on trial)."""
    with edit_journal() as journal:
        answer = journal.pending_answer
        if journal.current != constants.VERSION.root and journal.candidate is None:
            journal.current = constants.VERSION.root
        journal.pending_answer = None
        last_outcome = journal.last_outcome
    if answer is None:
        return
    config: dict[str, object] = {
        "general": {
            "config_revision": answer.config_revision,
            "software_version": answer.software_version,
        }
    }
    mark_revision(answer.config_revision, accepted=answer.status == "accepted")
    if answer.status == "accepted":
        logger.info(last_outcome or f"now running {answer.software_version}")
    else:
        logger.warning(f"version {answer.software_version} was rolled back", details=answer.reason)
    record_config_outcome(
        answer.config_revision, answer.software_version, answer.status, answer.reason
    )
    messaging_agent.add_message(
        ConfigMessageBody.about(
            answer.status,
            config,
            answer.reason,
            software_update="UPDATED" if answer.status == "accepted" else "FAILED",
        )
    )
