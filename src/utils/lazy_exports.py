"""Names a package exports but imports only when first used (PEP 562), so that
a process loads only what it uses: the one helper behind `src.utils` and
`src.utils.update`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def lazy_attribute(package: str, exports: Mapping[str, str], name: str) -> Any:
    """`package`'s attribute `name`: an exported name from the module
    `exports[name]` of the package, else a submodule of that name; raise
    AttributeError otherwise. Called by the packages' `__getattr__`."""
    module = exports.get(name)
    if module is not None:
        return getattr(importlib.import_module(f"{package}.{module}"), name)
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{package}.{name}":
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
