"""Supervision of real child processes: restarts, backoff, crash loops,
signal handling and teardown."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.synchronize import Event
from types import FrameType

import pytest

from src import constants
from src.types import Config
from src.utils.lifecycle_manager import LifecycleManager, teardown_in_parallel
from src.utils.logger import Logger
from tests.conftest import template_config_dict, wait_until

pytestmark = pytest.mark.integration


def sleeping_procedure(config: Config, name: str) -> None:
    while True:
        time.sleep(0.05)


def crashing_procedure(config: Config, name: str) -> None:
    raise RuntimeError(f"{name} cannot reach its instrument")


def stubborn_procedure(config: Config, name: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)


def draining_backend(config: Config, name: str, teardown_indicator: Event) -> None:
    while not teardown_indicator.wait(0.05):
        pass
    with open(os.path.join(constants.DATA_DIR, "drained"), "w") as f:
        f.write("yes")


def make_manager(target: object, variant: str = "procedure", **kwargs: float) -> LifecycleManager:
    config = Config.model_validate(template_config_dict())
    return LifecycleManager(config, target, "child", variant, Logger(None, "test"), **kwargs)  # type: ignore[arg-type]


def log_text() -> str:
    return Logger.read_current_log_file() or ""


def test_killed_child_is_restarted_and_the_cause_recorded() -> None:
    manager = make_manager(sleeping_procedure)
    manager.start_procedure()
    try:
        first_pid = manager.status().pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        killed_at = time.time()

        def restarted() -> bool:
            manager.supervise()
            return manager.status().pid not in (None, first_pid)

        assert wait_until(restarted, timeout=10)
        print(f"restarted after {time.time() - killed_at:.3f} s")
        status = manager.status()
        assert status.alive and status.restarts == 1
        assert status.last_error == "killed by signal SIGKILL"
    finally:
        teardown_in_parallel([manager])
    assert not manager.is_alive()


def test_crash_loop_backs_off_and_is_reported_once() -> None:
    manager = make_manager(crashing_procedure, first_restart_delay=0.01, max_restart_delay=0.08)
    manager.start_procedure()
    deadline = time.time() + 30
    while manager.restarts < 8 and time.time() < deadline:
        manager.supervise()
        time.sleep(0.005)
    teardown_in_parallel([manager])
    assert manager.restarts >= 8
    assert manager.last_error == "RuntimeError: child cannot reach its instrument"
    text = log_text()
    assert text.count("is crash-looping") == 1
    assert text.count("stopped unexpectedly") == 2  # the crashes before the loop was declared
    assert manager.consecutive_crashes >= 8
    assert manager.next_start_at is None


def test_backoff_resets_after_a_stable_run() -> None:
    manager = make_manager(sleeping_procedure, stable_seconds=0.0)
    manager.start_procedure()
    try:
        for _ in range(3):
            pid = manager.status().pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

            def restarted(old_pid: int = pid) -> bool:
                manager.supervise()
                return manager.status().pid not in (None, old_pid)

            assert wait_until(restarted, timeout=10)
        assert manager.consecutive_crashes == 1  # every run counted as stable
        assert "is crash-looping" not in log_text()
    finally:
        teardown_in_parallel([manager])


def test_children_do_not_run_the_parents_signal_handlers(data_dir: str) -> None:
    marker = os.path.join(data_dir, "handler-ran-in")

    def parent_handler(signum: int, frame: FrameType | None) -> None:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")

    previous = signal.signal(signal.SIGTERM, parent_handler)
    try:
        manager = make_manager(sleeping_procedure)
        manager.start_procedure()
        assert wait_until(manager.is_alive, timeout=5)
        teardown_in_parallel([manager])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert manager.process is not None and manager.process.exitcode == 0
    assert not os.path.exists(marker)


def test_procedure_ignoring_sigterm_is_killed_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(constants, "SECONDS_PER_GRACEFUL_PROCEDURE_TEARDOWN", 1)
    manager = make_manager(stubborn_procedure)
    manager.start_procedure()
    time.sleep(0.3)  # let it install its SIG_IGN
    teardown_in_parallel([manager])
    assert manager.process is not None and manager.process.exitcode == -signal.SIGKILL
    assert "did not stop in time" in log_text()


def test_backend_gets_its_teardown_indicator_and_drains(data_dir: str) -> None:
    manager = make_manager(draining_backend, variant="backend")
    manager.start_procedure()
    assert wait_until(manager.is_alive, timeout=5)
    teardown_in_parallel([manager])
    assert manager.process is not None and manager.process.exitcode == 0
    with open(os.path.join(data_dir, "drained")) as f:
        assert f.read() == "yes"


def test_no_restart_during_teardown() -> None:
    manager = make_manager(sleeping_procedure)
    manager.start_procedure()
    teardown_in_parallel([manager])
    manager.supervise()
    assert not manager.is_alive() and manager.restarts == 0


def test_the_reference_api_of_the_lifecycle_manager() -> None:
    config = Config.model_validate(template_config_dict())
    with pytest.raises(ValueError, match="a backend entrypoint takes 3 arguments"):
        LifecycleManager(config, sleeping_procedure, "wrong", "backend")
    with pytest.raises(ValueError, match="a procedure entrypoint takes 2 arguments"):
        LifecycleManager(config, draining_backend, "wrong", "procedure")
    manager = LifecycleManager(config, sleeping_procedure, "child", "procedure")
    assert not manager.procedure_is_running()
    with pytest.raises(RuntimeError, match="has not been started"):
        manager.check_procedure_status()
    manager.start_procedure()
    try:
        assert manager.procedure_is_running()
        with pytest.raises(RuntimeError, match="running already"):
            manager.start_procedure()
        manager.check_procedure_status()  # alive: nothing to record
        assert manager.last_error is None
    finally:
        manager.teardown()
    assert not manager.is_alive() and not manager.procedure_is_running()


def test_a_wall_clock_stepped_back_after_a_crash_does_not_postpone_the_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the chaos harness's clock steps: the restart was scheduled in wall-clock
    # time, so an NTP step back of an hour postponed it by an hour
    manager = make_manager(sleeping_procedure)
    manager.start_procedure()
    try:
        pid = manager.status().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not manager.is_alive(), 10)
        manager.check_procedure_status()  # the crash is noticed, the restart scheduled
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)

        def restarted() -> bool:
            manager.supervise()
            return manager.restarts == 1

        assert wait_until(restarted, 10)
        assert manager.is_alive()
    finally:
        teardown_in_parallel([manager])
