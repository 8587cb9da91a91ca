"""Start, stop and detect the main loop of this installation.

The main loop holds `data/ivy.lock` and every child inherits it, so "the lock
is taken" means "some process of this installation is alive", and "the lock is
free" means "all of them are gone".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from src import constants

from .file_lock import single_instance_lock
from .state_interface import StateInterface

SCRIPT_PATH: str = os.path.join(constants.PROJECT_DIR, "run.py")


class MainloopToggleError(Exception):
    """Starting or stopping the main loop did not work; the message says why."""


def is_running() -> bool:
    """Whether any process of this installation is alive. Called by the CLI."""
    if not os.path.exists(constants.MAINLOOP_LOCK_PATH):
        return False
    try:
        with single_instance_lock(constants.MAINLOOP_LOCK_PATH):
            return False
    except TimeoutError:
        return True


def get_mainloop_pid() -> int | None:
    """The main loop's pid when it is running, else None."""
    if not is_running():
        return None
    pid = StateInterface.load().mainloop.pid
    return pid if pid is not None and psutil.pid_exists(pid) else None


def start_mainloop(timeout: float = 60.0) -> int:
    """Start `run.py` detached from this terminal and return its pid once the
    main loop has started its children. Raise `MainloopToggleError` (with the
    main loop's own output) when it exits instead. Called by `ivy start`."""
    if is_running():
        raise MainloopToggleError(f"Ivy is already running (pid {get_mainloop_pid()})")
    os.makedirs(constants.LOGS_DIR, exist_ok=True)
    output_offset = _file_size(constants.MAINLOOP_OUTPUT_PATH)
    with open(constants.MAINLOOP_OUTPUT_PATH, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, SCRIPT_PATH],
            cwd=constants.PROJECT_DIR,
            stdin=subprocess.DEVNULL,
            # the console channel is for foreground runs (systemd's journal);
            # a detached main loop logs to its daily files
            stdout=subprocess.DEVNULL,
            stderr=output,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MainloopToggleError(
                f"the main loop exited with code {process.returncode}:\n"
                + _read_from(constants.MAINLOOP_OUTPUT_PATH, output_offset)
            )
        mainloop = StateInterface.load().mainloop
        if process.pid in (mainloop.pid, mainloop.guard_pid):  # a main loop, or a trial's guard
            return process.pid
        time.sleep(0.1)
    raise MainloopToggleError(f"the main loop (pid {process.pid}) did not come up in {timeout} s")


def stop_mainloop(timeout: float) -> None:
    """Send SIGTERM to the main loop and wait until every process of this
    installation is gone; after `timeout` seconds kill whatever is left. Called
    by `ivy stop` and `ivy restart`."""
    pid = get_mainloop_pid()
    if pid is None:
        if is_running():
            raise MainloopToggleError("Ivy holds its lock but its main loop pid is unknown")
        return
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        os.kill(pid, signal.SIGTERM)
    except (psutil.NoSuchProcess, ProcessLookupError):
        family = []
    deadline = time.monotonic() + timeout
    while is_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    # the lock goes with the last file descriptor, a moment before the process
    # itself: wait for every process that was there when we asked
    _, alive = psutil.wait_procs(family, timeout=max(1.0, deadline - time.monotonic()))
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()[-4000:]
    except OSError:
        return ""


class MainloopToggle:
    """The reference API's names for starting and stopping the main loop in
    the background (the functions above do the work)."""

    @staticmethod
    def get_mainloop_pids() -> list[int]:
        """The pids of the main loop and its children; empty when it is not
        running."""
        pid = get_mainloop_pid()
        if pid is None:
            return []
        try:
            return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    @staticmethod
    def start_mainloop() -> None:
        """Start the main loop in the background and print its pid."""
        print(f"started the main loop (pid {start_mainloop()})")

    @staticmethod
    def stop_mainloop() -> None:
        """Stop the main loop and its children and print their pids."""
        pids = MainloopToggle.get_mainloop_pids()
        stop_mainloop(constants.SECONDS_PER_GRACEFUL_PROCEDURE_TEARDOWN + 3_600 + 15)
        print(f"stopped the main loop (pids {pids})")
