#!/usr/bin/env python3
"""Entrypoint of the main loop: load the .env files (through src.constants),
take the single-instance lock, validate the config and run the main loop.
Exits 1 with a clear message when another instance runs or the config is bad."""

import sys


def main() -> int:
    """Run the main loop in the foreground; used by `ivy start` and by systemd."""
    import filelock

    from src import constants
    from src.types import Config, ConfigError
    from src.utils import mainloop_toggle

    try:
        lock = mainloop_toggle.acquire_mainloop_lock()
    except filelock.Timeout:
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

    try:
        mainloop.run(config)
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
