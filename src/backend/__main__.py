"""Run one backend on its own, outside the main loop:
`python -m src.backend CONFIG_PATH`. SIGTERM sets the teardown indicator (the
backend drains, then stops); used by tests, benchmarks, and operators who
debug a broker connection."""

import multiprocessing
import signal
import sys

from src import procedures  # noqa: F401 - registers the procedures' config sections
from src.backend import BACKENDS
from src.types import Config, ConfigError


def main() -> int:
    """Load the config, run its backend until SIGTERM, exit 0; 1 on a bad config."""
    if len(sys.argv) != 2:
        print("usage: python -m src.backend CONFIG_PATH", file=sys.stderr)
        return 2
    try:
        config = Config.load(sys.argv[1])
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if config.backend is None:
        print(f"{sys.argv[1]}: backend is null; nothing to run", file=sys.stderr)
        return 1
    teardown_indicator = multiprocessing.Event()
    signal.signal(signal.SIGTERM, lambda *_: teardown_indicator.set())
    BACKENDS[config.backend.provider](config, "backend", teardown_indicator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
