#!/usr/bin/env python3
"""Entrypoint of the main loop: load the .env files (through src.constants),
take the single-instance lock, validate the config and run the main loop.
Exits 1 with a clear message when another instance runs or the config is bad.
When the main loop stopped to hand over to a new software version, the lock
is released and this process becomes that version's main loop, through the
CLI pointer (same pid: systemd, `ivy start` and cron see one main loop)."""

import contextlib
import os
import sys


def main() -> int:
    """Run the main loop in the foreground; used by `ivy start` and by systemd."""
    from src import constants, procedures  # noqa: F401 - registers their config sections
    from src.types import Config, ConfigError
    from src.utils.functions import with_automation_lock

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(with_automation_lock())
        except TimeoutError:
            print(
                f"Ivy is already running for the data directory {constants.DATA_DIR}",
                file=sys.stderr,
            )
            return 1
        try:
            config = Config.load()
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1

        from src import main as mainloop

        handover_to = mainloop.run(config)
    if handover_to is not None:
        from src.utils.updater import cli_pointer_path

        pointer = cli_pointer_path()
        print(f"handing over to version {handover_to} through {pointer}", file=sys.stderr)
        sys.stderr.flush()
        os.execv(pointer, [pointer, "run"])  # noqa: S606 - our own pointer, no shell
    return 0


if __name__ == "__main__":
    sys.exit(main())
