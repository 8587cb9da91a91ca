"""Backends. Each module has `run(config, name, teardown_indicator)`, which
drains the message queue to its broker until the indicator is set."""

from collections.abc import Callable
from multiprocessing.synchronize import Event

from src.types import Config

BACKENDS: dict[str, Callable[[Config, str, Event], None]] = {}
