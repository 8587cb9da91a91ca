"""Ivy: the data-acquisition supervisor of one sensor station.

`import src` and then `src.constants`, `src.types.Config`,
`src.utils.Logger(...)`, as Ivy 1.1 code writes it: the subpackages are
imported on first use (PEP 562), so that a process imports only what it uses."""

import importlib
import os
from typing import Any

# tum-esm-utils imports all of its submodules (asyncio, plotting helpers, ...)
# unless told not to; Ivy imports the two it uses by name. Measured with
# `python -m benchmarks footprint`: about 1 MiB less per station.
os.environ.setdefault("TUM_ESM_UTILS_EXPLICIT_IMPORTS", "1")

_SUBMODULES = ("constants", "types", "utils", "procedures", "backend", "main")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
