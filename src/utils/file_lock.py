"""An exclusive lock on a file (`flock`), shared by every process of Ivy.

Ivy runs on Linux only, and the `filelock` package costs each station about
3 MiB of memory for what is a few lines of `fcntl` here (it imports asyncio
and sqlite3 for its other lock kinds; measured with `python -m benchmarks
footprint`). The semantics are the ones Ivy relies on:

- the lock belongs to the open file, so children forked while it is held keep
  it held until the last of them exits;
- it is re-entrant within one thread (a nested `with` does not wait for itself)
  and exclusive between threads and processes.
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
