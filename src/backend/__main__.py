"""Run one backend on its own, outside the main loop:
`python -m src.backend CONFIG_PATH [DESTINATION]` (default: the config's
first destination). SIGTERM sets the teardown indicator (the
backend drains, then stops); used by tests, benchmarks, and operators who
debug a broker connection."""

import multiprocessing
import signal
import sys

from src import procedures  # noqa: F401 - registers the procedures' config sections
from src.backend import BACKENDS
from src.types import Config, ConfigError
from src.types.config import destination_process_name


def main() -> int:
    """Load the config, run the destination's backend until SIGTERM, exit 0;
    1 on a bad config or an unknown destination, 2 on bad usage."""
    if len(sys.argv) not in (2, 3):
        print("usage: python -m src.backend CONFIG_PATH [DESTINATION]", file=sys.stderr)
        return 2
    try:
        config = Config.load(sys.argv[1])
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    destinations = config.destinations()
    if not destinations:
        print(f"{sys.argv[1]}: no backend (backend is null, backends empty)", file=sys.stderr)
        return 1
    name = sys.argv[2] if len(sys.argv) == 3 else next(iter(destinations))
    section = destinations.get(name)
    if section is None:
        print(
            f"{sys.argv[1]}: no destination {name!r} (has: {', '.join(destinations)})",
            file=sys.stderr,
        )
        return 1
    teardown_indicator = multiprocessing.Event()
    signal.signal(signal.SIGTERM, lambda *_: teardown_indicator.set())
    BACKENDS[section.provider](config, destination_process_name(name), teardown_indicator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
