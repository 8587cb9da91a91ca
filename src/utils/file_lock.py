"""An exclusive lock on a file (`flock`), shared by every process of Ivy.

Why not the `filelock` package the design card names: measured on
2026-12-02 with `python -m benchmarks footprint`, a station whose locks were
filelock 4.1 (the version this lock holds; tum-esm-utils asks for >= 3.18,
so no lighter one can be used) took 66.5 MiB PSS for its four processes
against 57.3 MiB with this module: filelock imports asyncio, ssl and its own
fork machinery into every process. And filelock 4 closes a held lock's
descriptor in forked children, which would break the first rule below. The
semantics Ivy relies on:

- the lock belongs to the open file, so children forked while it is held keep
  it held until the last of them exits (`file_lock` and
  `single_instance_lock` alike);
- `file_lock` is re-entrant within one thread (a nested `with` does not wait
  for itself) and exclusive between threads and processes;
- `single_instance_lock` is never re-entrant: a second hold in the same
  process fails like one in another process (Ivy 1.1's `with_automation_lock`
  raises `TimeoutError` then).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_POLL_SECONDS = 0.01
_held = threading.local()


def _held_here() -> set[str]:
    if not hasattr(_held, "paths"):
        _held.paths = set()
    paths: set[str] = _held.paths
    return paths


@contextmanager
def file_lock(path: str, timeout: float) -> Iterator[None]:
    """Hold the lock on `path` for the block; raise TimeoutError when another
    holder keeps it longer than `timeout` seconds (0: do not wait). Called by
    every process that reads or writes the state, and by run.py and the CLI
    for the single-instance lock."""
    held = _held_here()
    if path in held:
        yield
        return
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the lock {path} is held by another process") from None
                time.sleep(_POLL_SECONDS)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
    finally:
        # closing releases the lock only if no forked child shares the descriptor
        os.close(descriptor)


@contextmanager
def single_instance_lock(path: str) -> Iterator[None]:
    """Hold `path` exclusively for the block, or raise TimeoutError at once
    when anyone holds it, this process included. Called by run.py (through
    `with_automation_lock`) and by `ivy` to tell whether Ivy runs."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TimeoutError(f"the lock {path} is held") from None
        yield
    finally:
        # closing releases it only when no forked child shares the descriptor
        os.close(descriptor)
