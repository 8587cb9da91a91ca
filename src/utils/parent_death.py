"""A child process that never outlives its parent: the one rule for every child
Ivy starts (procedures and backends, the update worker, the commands of an
update step, a version's main loop on trial). A `kill -9` of the parent then
leaves nothing running, and the next start finds a clean slate."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a child, right after fork (or between fork and exec): ask the kernel
    to SIGKILL this process when its parent dies, and exit at once when the
    parent `parent_pid` died before the request took effect."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parents still stop their children on the way out
    if os.getppid() != parent_pid:
        os._exit(1)


def preexec_die_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the command dies with the process
    that starts it."""
    return functools.partial(die_with_parent, os.getpid())
