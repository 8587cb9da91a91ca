"""Read and update the shared `data/state.json` across processes.

`update()` holds the file lock over the whole read-modify-write, so concurrent
updates never lose each other's changes; the write is atomic. A file that does
not parse is moved aside as `state.json.corrupt-<time>`, logged, and replaced by
defaults, except for what guards the station against replayed configs, which
is kept wherever it can still be read.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator

import pydantic

from src import constants
from src.types import State
from src.types.atomic_file import write_atomically
from src.types.config import format_validation_error

from .file_lock import file_lock
from .logger import Logger

_LOCK_TIMEOUT_SECONDS = 30
_CORRUPT_COPIES_KEPT = 3
# the replay guards: lost with a corrupt file, every old signed config (or,
# unsigned, every old revision) would be new to the station again
_SALVAGED = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*([0-9][0-9.eE+]*)')
    for name in ("newest_signed_config_at", "highest_handled_config_revision")
}
# the reference API's module-level paths (read from src.constants at call time)
STATE_FILE: str = constants.STATE_PATH
STATE_FILE_LOCK: str = constants.STATE_LOCK_PATH


class StateInterface:
    """Static access to the state file; every process uses it directly."""

    @staticmethod
    def _lock() -> contextlib.AbstractContextManager[None]:
        os.makedirs(os.path.dirname(constants.STATE_LOCK_PATH), exist_ok=True)
        return file_lock(constants.STATE_LOCK_PATH, timeout=_LOCK_TIMEOUT_SECONDS)

    @staticmethod
    def load() -> State:
        """The current state (defaults when there is no file yet). Called by the
        CLI and by any process that only reads."""
        with StateInterface._lock():
            return StateInterface._read_unlocked()

    @staticmethod
    @contextlib.contextmanager
    def update() -> Iterator[State]:
        """`with StateInterface.update() as state: state.x = ...` — the changes are
        written atomically when the block ends without an exception. Called by the
        main loop, the procedures and the backend."""
        with StateInterface._lock():
            state = StateInterface._read_unlocked()
            yield state
            content = state.model_dump_json(indent=4)
            try:
                # what the next reader would make of it: a value that cannot
                # be read back (a wrong type appended to a list, NaN) is
                # refused here, at the writer, and never reaches the file
                State.model_validate_json(content)
            except pydantic.ValidationError as e:
                raise ValueError(format_validation_error(e, "the state update")) from None
            write_atomically(constants.STATE_PATH, content)

    @staticmethod
    def _read_unlocked() -> State:
        try:
            with open(constants.STATE_PATH, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return State()
        try:
            # bytes: pydantic reports invalid UTF-8 as a validation error too
            return State.model_validate_json(content)
        except pydantic.ValidationError as e:
            aside = (
                f"{constants.STATE_PATH}.corrupt-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            )
            os.replace(constants.STATE_PATH, aside)
            _keep_newest_corrupt_copies()
            Logger(None, "state-interface").error(
                f"state file could not be read and was moved to {aside}; starting from defaults",
                details=str(e),
            )
            return _salvaged(content)


def _salvaged(content: bytes) -> State:
    """Defaults, with the replay guards found in the unreadable `content`
    (a truncated file or one with a field of the wrong type still has them)."""
    state = State()
    for name, pattern in _SALVAGED.items():
        found = pattern.search(content)
        if found is not None:
            # the model converts and checks the text as it would the file's
            with contextlib.suppress(pydantic.ValidationError):
                setattr(state, name, found[1].decode())
    return state


def _keep_newest_corrupt_copies() -> None:
    """A state file that keeps getting corrupted must not fill the disk."""
    directory = os.path.dirname(constants.STATE_PATH)
    prefix = os.path.basename(constants.STATE_PATH) + ".corrupt-"
    copies = sorted(name for name in os.listdir(directory) if name.startswith(prefix))
    for name in copies[:-_CORRUPT_COPIES_KEPT]:
        os.remove(os.path.join(directory, name))
