"""Run one backend process outside the main loop, as the main loop would:
`python tests/backend_runner.py CONFIG_PATH`. SIGTERM sets the teardown
indicator (so the backend drains and stops); SIGKILL is a crash."""

import multiprocessing
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.backend import BACKENDS
from src.types import Config

if __name__ == "__main__":
    config = Config.load(sys.argv[1])
    assert config.backend is not None
    teardown_indicator = multiprocessing.Event()
    signal.signal(signal.SIGTERM, lambda *_: teardown_indicator.set())
    BACKENDS[config.backend.provider](config, "backend", teardown_indicator)
