"""Measurement procedures, discovered: every module in this package that
exposes `info = ProcedureInfo(...)` is a procedure named after the module, with
a config section of the same name. Adding a procedure is adding one module.
A module written for Ivy 1.1, with a `run(config, name)` and no `info`, runs
too; its section is taken as it is (`UnvalidatedSection`).

A module that cannot be imported, has no `info`, or whose `run` does not take
(config, name) is not run; the problem is kept in `PROBLEMS` for `ivy config
check`, `ivy start` and the main loop's log, and its config section is
accepted as it is, so that one broken module never stops the station.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from src.types import register_procedure_sections
from src.types.procedure import ProcedureInfo, UnvalidatedSection
from src.types.state import register_procedure_states


def _discover() -> tuple[dict[str, ProcedureInfo], dict[str, str]]:
    found: dict[str, ProcedureInfo] = {}
    problems: dict[str, str] = {}
    for module_info in pkgutil.iter_modules(__path__):
        name = module_info.name
        if name.startswith("_"):
            continue
        where = f"src/procedures/{name}.py"
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except Exception as e:
            problems[name] = f"{where} cannot be imported: {type(e).__name__}: {e}"
            continue
        info = getattr(module, "info", None)
        if info is None and callable(getattr(module, "run", None)):
            info = ProcedureInfo(run=module.run, config_model=UnvalidatedSection)
        if not isinstance(info, ProcedureInfo):
            problems[name] = f"{where} has no `info = ProcedureInfo(run=..., config_model=...)`"
            continue
        try:
            parameters = list(inspect.signature(info.run).parameters)
        except (TypeError, ValueError):
            parameters = []
        if len(parameters) != 2:
            problems[name] = (
                f"{where}: run must take (config, name), it takes ({', '.join(parameters)})"
            )
            continue
        found[name] = info
    return found, problems


PROCEDURES, PROBLEMS = _discover()
register_procedure_sections(
    {**{name: info.config_model for name, info in PROCEDURES.items()}, **dict.fromkeys(PROBLEMS)}
)
register_procedure_states(
    {name: info.state_model for name, info in PROCEDURES.items() if info.state_model is not None}
)
