"""Backends. Each provider module has `run(config, name, teardown_indicator)`,
which drains the message queue to its broker until the indicator is set."""

from collections.abc import Callable
from multiprocessing.synchronize import Event

from src.types import Config

from . import tenta, thingsboard

BACKENDS: dict[str, Callable[[Config, str, Event], None]] = {
    "tenta": tenta.run,
    "thingsboard": thingsboard.run,
}
