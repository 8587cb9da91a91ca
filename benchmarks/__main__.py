"""`python -m benchmarks [NAME ...] [--quick]`: run all or the named benchmarks
and print one JSON object per line and figure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

from .common import Figure

BenchmarkFunction = Callable[[bool], Iterator[Figure]]


def registry() -> dict[str, BenchmarkFunction]:
    """Every benchmark by name, imported lazily."""
    from . import destinations, drain, enqueue, export, fleet, footprint, trust, update

    return {
        "enqueue": enqueue.run,
        "drain": drain.run_drain,
        "backlog": drain.run_backlog,
        "destinations": destinations.run_destinations,
        "reconnect": destinations.run_reconnect,
        "export": export.run,
        "update": update.run,
        "trust": trust.run,
        "footprint": footprint.run,
        "fleet": fleet.run,
    }


# run only when named: minutes of 50 real stations, not part of a plain run
EXPLICIT_ONLY = {"fleet"}


def main() -> int:
    """Parse arguments, run, print."""
    benchmarks = registry()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"any of {', '.join(benchmarks)} (default: all but {', '.join(EXPLICIT_ONLY)})",
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs, well under a minute")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    for name in args.names or [n for n in benchmarks if n not in EXPLICIT_ONLY]:
        for figure in benchmarks[name](args.quick):
            print(figure.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
