"""What a procedure module exposes, in the shape of hat-event's module info:
one `info` record saying how to run it and what its config section (and,
optionally, its state section) looks like. The host discovers the modules in
`src/procedures/`, imports each by name and validates its section with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pydantic

from .config import Config


@dataclass(frozen=True)
class ProcedureInfo:
    """`info = ProcedureInfo(run=run, config_model=MyConfig)` at the end of a
    procedure module. `run(config, name)` loops forever in its own process;
    `config_model` validates the module's section of the config (named after
    the module); `state_model`, if given, its section of the shared state."""

    run: Callable[[Config, str], None]
    config_model: type[pydantic.BaseModel]
    state_model: type[pydantic.BaseModel] | None = None


class UnvalidatedSection(pydantic.BaseModel):
    """The config section of a procedure module that declares no model (one
    written for Ivy 1.1, with `run(config, name)` only): any keys, read as
    attributes (`config.my_procedure.seconds_between_datapoints`), checked by
    nobody but the procedure."""

    model_config = pydantic.ConfigDict(extra="allow")
