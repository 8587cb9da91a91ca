"""The flock-based lock that replaced the `filelock` package: exclusive between
processes and threads, re-entrant in one thread, and held by forked children
(the single-instance lock relies on that)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from src import constants
from src.utils.file_lock import file_lock, single_instance_lock

_TRY_LOCK = """
import sys
from src.utils.file_lock import file_lock
try:
    with file_lock(sys.argv[1], timeout=0.2):
        print("got")
except TimeoutError:
    print("timeout")
"""


def test_exclusive_between_processes_and_reentrant(tmp_path: Any) -> None:
    path = str(tmp_path / "x.lock")
    with file_lock(path, timeout=0):
        with file_lock(path, timeout=0):  # the same thread does not wait for itself
            pass
        other = subprocess.run(
            [sys.executable, "-c", _TRY_LOCK, path],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=constants.PROJECT_DIR,
        )
        assert other.stdout.strip() == "timeout", other.stderr
    with file_lock(path, timeout=0):  # released
        pass


def test_exclusive_between_threads(tmp_path: Any) -> None:
    path = str(tmp_path / "x.lock")
    inside: list[int] = []
    overlaps: list[int] = []

    def worker() -> None:
        for _ in range(20):
            with file_lock(path, timeout=10):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps


def test_a_forked_child_keeps_it_held_after_the_parent_lets_go(tmp_path: Any) -> None:
    path = str(tmp_path / "x.lock")
    reader, writer = os.pipe()
    with file_lock(path, timeout=0):
        pid = os.fork()
        if pid == 0:
            os.close(writer)
            os.read(reader, 1)  # hold the inherited descriptor until told
            os._exit(0)
    os.close(reader)
    try:
        with pytest.raises(TimeoutError, match=r"x\.lock"):
            with file_lock(path, timeout=0.1):
                pass
    finally:
        os.write(writer, b"x")
        os.waitpid(pid, 0)
    with file_lock(path, timeout=1):
        pass


def test_the_single_instance_lock_is_never_reentrant(tmp_path: Any) -> None:
    """Ivy 1.1's contract for `with_automation_lock`: a second hold in the
    same process fails at once, as one in another process does."""
    path = str(tmp_path / "ivy.lock")
    with single_instance_lock(path):
        with pytest.raises(TimeoutError):
            with single_instance_lock(path):
                pass
        with pytest.raises(TimeoutError):
            with file_lock(path, timeout=0):
                pass
    with single_instance_lock(path):
        pass
