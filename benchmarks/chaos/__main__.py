"""`python -m benchmarks.chaos`: one chaos run, its report as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from .harness import FAULT_KINDS, Settings, run_chaos


def main() -> int:
    """Parse the arguments, run, print the report; 1 when the run is not ok."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--duration", type=float, default=Settings.duration_s, help="seconds")
    parser.add_argument("--rate", type=float, default=Settings.messages_per_second)
    parser.add_argument("--max-queued", type=int, default=Settings.max_queued_messages)
    parser.add_argument("--sample-interval", type=float, default=Settings.sample_interval_s)
    parser.add_argument(
        "--faults", default=",".join(FAULT_KINDS), help=f"of {', '.join(FAULT_KINDS)}"
    )
    parser.add_argument("--report", help="also write the report to this file")
    parser.add_argument("--scratch", help="run in this directory and keep it (default: a temp dir)")
    arguments = parser.parse_args()
    faults = tuple(kind for kind in arguments.faults.split(",") if kind)
    unknown = set(faults) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    report = run_chaos(
        Settings(
            seed=arguments.seed,
            duration_s=arguments.duration,
            messages_per_second=arguments.rate,
            max_queued_messages=arguments.max_queued,
            faults=faults,
            sample_interval_s=arguments.sample_interval,
        ),
        arguments.scratch,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.report:
        with open(arguments.report, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
