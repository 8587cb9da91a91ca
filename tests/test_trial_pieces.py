"""The pieces of a trial on their own: the health definition, the journal's
resolution at start after a power loss in a commit or a rollback, and the
systemd notifications."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

from src import constants
from src.types import ProcessState, State
from src.types.state import BackendConnectionState
from src.utils import systemd_notify
from src.utils.update.health import HealthWatch
from src.utils.update.journal import Candidate, JournalError, load_journal, save_journal
from src.utils.update.paths import cli_pointer_path
from src.utils.update.version_trial import Guard, request_rollback, resolve_at_start

pytestmark = [pytest.mark.quick, pytest.mark.updater]


def healthy_state(stamp: float) -> State:
    """A healthy station whose reports carry wall-clock times around `stamp`."""
    state = State()
    state.mainloop.pid = 1
    state.mainloop.last_heartbeat = stamp
    state.processes = {
        "backend": ProcessState(variant="backend", alive=True, started_at=stamp - 60),
        "dummy_procedure": ProcessState(variant="procedure", alive=True, started_at=stamp - 60),
    }
    state.backend_connection = BackendConnectionState(
        connected=True, detail="connected", since=stamp - 50, last_acknowledgment=stamp - 1
    )
    return state


def watch_that_saw_it_run(
    before: State, after: State, destinations: tuple[str, ...] = ("backend",)
) -> HealthWatch:
    """A judge that has seen `after` first at monotonic 0 (31 s before the checks below)."""
    watch = HealthWatch(before, 30, destinations)
    watch.problem(after, now=0.0)
    return watch


def test_the_health_definition_names_what_is_missing() -> None:
    now = time.time()
    before = healthy_state(now - 1000)
    assert watch_that_saw_it_run(before, healthy_state(now)).problem(healthy_state(now), 31) is None

    cases: list[tuple[str, Any, str]] = [
        ("mainloop", ("last_heartbeat", now - 1000), "has not written a heartbeat"),
        ("dummy_procedure", ("alive", False), "dummy_procedure is not running"),
        ("dummy_procedure", ("restarts", 1), "dummy_procedure restarted 1 time(s)"),
        ("dummy_procedure", ("crash_looping", True), "dummy_procedure is crash-looping"),
        ("dummy_procedure", ("started_at", now - 1060), "has not started since the change"),
        ("connection", ("connected", False), "not connected to the broker"),
        ("connection", ("since", now - 1050), "not connected to the broker (no report since)"),
        ("connection", ("last_acknowledgment", now - 1001), "has not acknowledged a message"),
    ]
    for part, (field, value), expected in cases:
        state = healthy_state(now)
        target = {
            "mainloop": state.mainloop,
            "connection": state.backend_connection,
        }.get(part) or state.processes[part]
        setattr(target, field, value)
        problem = watch_that_saw_it_run(before, state).problem(state, 31)
        assert problem is not None and expected in problem, (part, field, problem)
    # nothing was due for a destination since its backend started (it gets
    # only data, and none was measured): connected is all it can show
    idle = healthy_state(now)
    assert idle.backend_connection is not None
    idle.backend_connection.last_acknowledgment = None
    assert "has not acknowledged" in (watch_that_saw_it_run(before, idle).problem(idle, 31) or "")
    idle.backend_connection.idle = True
    assert watch_that_saw_it_run(before, idle).problem(idle, 31) is None
    idle.backend_connection.connected = False
    assert "not connected" in (watch_that_saw_it_run(before, idle).problem(idle, 31) or "")
    without_broker = healthy_state(now)
    without_broker.backend_connection = None
    del without_broker.processes["backend"]
    watch = watch_that_saw_it_run(before, without_broker, destinations=())
    assert watch.problem(without_broker, 31) is None


def test_run_time_and_heartbeat_age_are_judged_on_the_monotonic_clock() -> None:
    """Times in the state are only compared for equality with the state
    before the change: a clock stepped back an hour during the trial (NTP on a
    board without a real-time clock) leaves a healthy station healthy."""
    now = time.time()
    stepped_back = healthy_state(now - 3600)
    watch = HealthWatch(healthy_state(now), 30, ["backend"])
    problem = watch.problem(stepped_back, now=100.0)
    assert problem is not None and "has not run for 30 s yet" in problem
    assert watch.problem(stepped_back, now=131.0) is None
    # the same heartbeat 35 s later: the main loop hangs
    problem = watch.problem(stepped_back, now=136.0)
    assert problem is not None and "no heartbeat for 36 s" in problem
    stepped_back.mainloop.last_heartbeat = now - 3590
    assert watch.problem(stepped_back, now=137.0) is None
    # a restart during the trial starts its run time over
    stepped_back.processes["backend"].started_at = now - 3500
    problem = watch.problem(stepped_back, now=138.0)
    assert problem is not None and "backend has not run for 30 s yet" in problem


@pytest.fixture
def root(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    directory = str(tmp_path / "root")
    for version in ("1.0.0", "1.1.0"):
        os.makedirs(os.path.join(directory, version, ".venv", "bin"))
    monkeypatch.setattr(constants, "ROOT_DIR", directory)
    monkeypatch.setattr(constants, "PROJECT_DIR", os.path.join(directory, "1.0.0"))
    monkeypatch.setattr(constants.VERSION, "root", "1.0.0")
    return directory


def on_trial(phase: str) -> None:
    journal = load_journal()
    journal.current = "1.0.0"
    journal.candidate = Candidate(
        version="1.1.0",
        from_version="1.0.0",
        config_revision=9,
        switched_at=time.time(),
        phase=phase,
        problem="not healthy",
    )
    save_journal(journal)


def test_a_commit_cut_short_is_finished_by_the_next_start(root: str) -> None:
    on_trial("committed")
    assert resolve_at_start() == "exec"  # the pointer now names 1.1.0, not us
    with open(cli_pointer_path()) as f:
        assert "/1.1.0/" in f.read()
    journal = load_journal()
    assert (journal.current, journal.previous, journal.candidate) == ("1.1.0", "1.0.0", None)
    assert journal.pending_answer is not None and journal.pending_answer.status == "accepted"


def test_a_rollback_cut_short_is_finished_by_the_next_start(root: str) -> None:
    on_trial("rolling_back")
    assert resolve_at_start() == "run"  # the pointer names us, the previous version
    journal = load_journal()
    assert (journal.current, journal.candidate) == ("1.0.0", None)
    assert journal.bad_versions == ["1.1.0"]
    assert journal.pending_answer is not None and journal.pending_answer.status == "rejected"


def test_a_trial_cut_short_is_resumed_by_a_guard(root: str) -> None:
    on_trial("trial")
    assert resolve_at_start() == "guard"


def test_an_ivy_rollback_request_survives_the_guard_recording_a_failed_start(root: str) -> None:
    """Three processes edit the journal (main loop, guard, `ivy rollback`). The
    guard once saved the copy it had read at its start, so a rollback asked
    for meanwhile was overwritten and the trial went on. Every edit now reads
    under the lock and the guard writes only its own fields."""
    on_trial("trial")
    guard = Guard()  # reads the candidate, as the guard does when a trial starts
    assert request_rollback() == "asked the guard to roll 1.1.0 back to 1.0.0"
    guard._record(attempts=2, problem="its main loop exited with code 1")
    candidate = load_journal().candidate
    assert candidate is not None and candidate.rollback_requested
    assert (candidate.attempts, candidate.problem) == (2, "its main loop exited with code 1")


def test_a_candidate_moves_only_as_the_journal_allows() -> None:
    candidate = Candidate(version="1.1.0", from_version="1.0.0", config_revision=1, switched_at=0)
    candidate.move_to("committed")
    with pytest.raises(JournalError, match="cannot move from committed to rolling_back"):
        candidate.move_to("rolling_back")
    with pytest.raises(JournalError, match="from committed to trial"):
        candidate.move_to("trial")


def test_systemd_hears_ready_and_watchdog(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        systemd_notify.notify("READY=1")
        assert listener.recv(100) == b"READY=1"
        monkeypatch.setattr(systemd_notify, "_last_watchdog", 0.0)
        systemd_notify.watchdog()
        systemd_notify.watchdog()  # throttled: one datagram
        assert listener.recv(100) == b"WATCHDOG=1"
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.recv(100)
    monkeypatch.delenv("NOTIFY_SOCKET")
    systemd_notify.notify("READY=1")  # outside systemd: nothing, no error
