"""The footprint benchmark's second floor, run by path in a fresh interpreter:
what every Ivy process must hold by the reference API (the interpreter,
pydantic and Ivy's types, a validated config, a serialized message), forked
after `gc.freeze()` as the lifecycle manager forks. Usage:
`python benchmarks/api_contract.py CHILDREN`; prints "ready", then sleeps
until killed."""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from src import constants
from src.types import Config, DataMessageBody


def hold_the_api_contract(children: int) -> None:
    """Import Ivy's types, freeze the heap and fork `children` processes, each
    validating the config template and serializing a message; then sleep.
    Called by this script for the footprint benchmark."""
    with open(os.path.join(constants.PROJECT_DIR, "config", "config.template.json")) as f:
        template = json.load(f)
    gc.freeze()
    for _ in range(children):
        if os.fork() == 0:
            Config.model_validate(template)
            DataMessageBody(data={"value": 1.0}).model_dump_json()
            gc.collect()
            time.sleep(600)
            os._exit(0)
    Config.model_validate(template)
    print("ready", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    hold_the_api_contract(int(sys.argv[1]))
