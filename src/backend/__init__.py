"""Backends. Each provider module (`tenta_backend`, `thingsboard_backend`) has
`run(config, name, teardown_indicator)`, which drains the message queue to its
broker until the indicator is set."""

from collections.abc import Callable
from multiprocessing.synchronize import Event

from src.types import Config

from . import tenta_backend, thingsboard_backend

BACKENDS: dict[str, Callable[[Config, str, Event], None]] = {
    "tenta": tenta_backend.run,
    "thingsboard": thingsboard_backend.run,
}
