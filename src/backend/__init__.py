"""Backends, discovered: every module `<provider>_backend.py` of this package
that exposes `info = BackendInfo(run=...)` serves the provider of its name
(`backend.provider` in the config). Its `run(config, name, teardown_indicator)`
drains the message queue to its broker until the indicator is set."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from multiprocessing.synchronize import Event

from src.types import Config
from src.types.backend import BackendInfo
from src.types.config import backend_provider_names


def _discover() -> dict[str, BackendInfo]:
    found: dict[str, BackendInfo] = {}
    for provider in backend_provider_names():
        module = importlib.import_module(f"{__name__}.{provider}_backend")
        info = getattr(module, "info", None)
        if not isinstance(info, BackendInfo):
            raise TypeError(f"src/backend/{provider}_backend.py has no `info = BackendInfo(...)`")
        found[provider] = info
    return found


BACKEND_INFOS: dict[str, BackendInfo] = _discover()
# the reference API's view: provider -> run
BACKENDS: dict[str, Callable[[Config, str, Event], None]] = {
    provider: info.run for provider, info in BACKEND_INFOS.items()
}
