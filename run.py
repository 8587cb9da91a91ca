#!/usr/bin/env python3
"""Entrypoint of the main loop: load the .env files (through src.constants),
take the single-instance lock, validate the config and run the main loop.
Exits 1 with a clear message when another instance runs or the config is bad.

Before running, the update journal is consulted (`version_trial`): a trial
that a restart interrupted is resumed, and a commit or rollback that a power
loss cut short is finished. When the main loop stops to hand over to a new
software version, this process becomes that version's guard, and when the
trial ends, it becomes the main loop of the version the CLI pointer names
(`exec`, same pid: systemd, `ivy start` and cron see one main loop)."""

import contextlib
import os
import sys


def _lock_or_fail(stack: contextlib.ExitStack) -> bool:
    from src import constants
    from src.utils.functions import with_automation_lock

    try:
        stack.enter_context(with_automation_lock())
    except TimeoutError:
        print(
            f"Ivy is already running for the data directory {constants.DATA_DIR}",
            file=sys.stderr,
        )
        return False
    return True


def _exec_pointer() -> int:
    from src.utils.update.paths import cli_pointer_path

    pointer = cli_pointer_path()
    print(f"continuing as the version {pointer} names", file=sys.stderr)
    sys.stderr.flush()
    os.execv(pointer, [pointer, "run"])  # noqa: S606 - our own pointer, no shell
    return 1  # not reached


def _guard_trial() -> int:
    """Judge the version on trial, then become the version the pointer names
    (unless the guard was told to stop)."""
    from src.utils.update import Guard

    with contextlib.ExitStack() as stack:
        if not _lock_or_fail(stack):
            return 1
        ended = Guard().run()
    return _exec_pointer() if ended else 0


def main() -> int:
    """Run the main loop in the foreground; used by `ivy start` and by systemd."""
    from src import procedures  # noqa: F401 - registers their config sections
    from src.types import Config, ConfigError
    from src.utils.update import is_guarded, resolve_at_start

    with contextlib.ExitStack() as stack:
        # a candidate on trial runs under its guard, which holds the lock for it
        if is_guarded():
            action = "run"
        else:
            if not _lock_or_fail(stack):
                return 1
            action = resolve_at_start()
        if action == "run":
            try:
                config = Config.load()
            except ConfigError as e:
                print(e, file=sys.stderr)
                return 1

            from src import main as mainloop

            if mainloop.run(config) is None:
                return 0
            action = "guard"  # all steps passed: the new version goes on trial
    if action == "guard":
        return _guard_trial()
    return _exec_pointer()


if __name__ == "__main__":
    sys.exit(main())
