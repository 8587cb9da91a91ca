"""What a backend module exposes, in the shape of hat-event's module info (as
procedures do, `procedure.ProcedureInfo`): one `info` record saying how to run
it. The host discovers the modules `src/backend/<provider>_backend.py`, imports
each by name, and runs the one a config's `backend.provider` names; a new
provider is one module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event

from .config import Config


@dataclass(frozen=True)
class BackendInfo:
    """`info = BackendInfo(run=run)` at the end of a backend module.
    `run(config, name, teardown_indicator)` drains the message queue to its
    server in its own process until the indicator is set."""

    run: Callable[[Config, str, Event], None]
