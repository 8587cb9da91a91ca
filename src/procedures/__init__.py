"""Measurement procedures. Each module has `run(config, name)`, which loops
forever; the main loop runs every procedure whose config section is set."""

from collections.abc import Callable

from src.types import Config

from . import dummy_procedure, system_checks

PROCEDURES: dict[str, Callable[[Config, str], None]] = {
    "dummy_procedure": dummy_procedure.run,
    "system_checks": system_checks.run,
}


def enabled_procedures(config: Config) -> dict[str, Callable[[Config, str], None]]:
    """The procedures whose config section is not null. Called by the main loop."""
    return {name: run for name, run in PROCEDURES.items() if getattr(config, name) is not None}
