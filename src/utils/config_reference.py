"""Render the config reference (Markdown) and the config's JSON Schema (for
editors) from the pydantic models, so that neither can drift from the code.
Called by `ivy config reference` and `ivy config schema`."""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

import pydantic
from pydantic.fields import FieldInfo

from src.types import Config
from src.types.config import procedure_sections

_CONSTRAINT_NAMES = {
    "ge": ">=",
    "gt": ">",
    "le": "<=",
    "lt": "<",
    "min_length": "min length",
    "max_length": "max length",
    "pattern": "pattern",
}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is list:
        return f"list of ({_type_name(typing.get_args(annotation)[0])})"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, pydantic.SecretStr):
        return "string (secret)"
    if isinstance(annotation, type) and issubclass(annotation, pydantic.RootModel):
        return "string (version)"
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return "object"
    return {str: "string", int: "integer", bool: "boolean", float: "number"}.get(
        annotation, str(annotation)
    )


def _constraints(field: FieldInfo) -> str:
    found: list[str] = []
    for item in field.metadata:
        for attribute, label in _CONSTRAINT_NAMES.items():
            value = getattr(item, attribute, None)
            if value is not None:
                if attribute == "pattern":
                    found.append(f"{label} `{str(value).replace('|', chr(92) + '|')}`")
                else:
                    found.append(f"{label} {value}")
    return ", ".join(found)


def _schema_enum(field: FieldInfo) -> list[Any] | None:
    extra = field.json_schema_extra
    if not callable(extra):
        return None
    schema: dict[str, Any] = {}
    extra(schema)
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "(section defaults)"
    return f"`{json.dumps(field.default)}`"


def _section_model(annotation: Any) -> type[pydantic.BaseModel] | None:
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
            if not issubclass(candidate, pydantic.RootModel):
                return candidate
    return None


def _render_model(model: type[pydantic.BaseModel], prefix: str, out: list[str]) -> None:
    nested: list[tuple[str, type[pydantic.BaseModel]]] = []
    out.append("| key | type | default | constraints | meaning |")
    out.append("|---|---|---|---|---|")
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is not None:
            nested.append((f"{prefix}.{name}", sub))
        description = re.sub(r"\s+", " ", field.description or "")
        type_name = _type_name(field.annotation)
        enum = _schema_enum(field)
        if enum is not None:  # a set of values known only at run time (backend providers)
            type_name = " \\| ".join(json.dumps(value) for value in enum)
        out.append(
            f"| `{name}` | {type_name} | {_default(field)} | "
            f"{_constraints(field)} | {description} |"
        )
    for path, sub in nested:
        out.append("")
        out.append(f"#### `{path}`")
        out.append("")
        _render_model(sub, path, out)


def _render_mapping(name: str, field: FieldInfo, out: list[str]) -> None:
    """A section that maps names to sections of a kind documented elsewhere
    (`backends`: name -> a `backend` section)."""
    key_type, value_type = typing.get_args(field.annotation)
    key_pattern = _constraints(FieldInfo.from_annotation(key_type))
    value_section = next(
        other
        for other, candidate in Config.model_fields.items()
        if other != name and _section_model(candidate.annotation) is value_type
    )
    description = re.sub(r"\s+", " ", field.description or "")
    out.append(f"### `{name}` (optional)")
    out.append("")
    out.append(
        f"{description} An object mapping each name ({key_pattern}) to a section with "
        f"the keys of [`{value_section}`](#{value_section}-optional-null-turns-it-off)."
    )
    out.append("")


def render_config_reference() -> str:
    """The whole reference: one table per section of `Config`, then one per
    procedure module (registered by `src.procedures`)."""
    out: list[str] = []
    for name, field in Config.model_fields.items():
        if typing.get_origin(field.annotation) is dict:
            _render_mapping(name, field, out)
            continue
        section = _section_model(field.annotation)
        assert section is not None
        nullable = type(None) in typing.get_args(field.annotation)
        _render_section(name, section, " (optional: `null` turns it off)" if nullable else "", out)
    for name, model in sorted(procedure_sections().items()):
        if model is not None:
            note = f" (procedure `src/procedures/{name}.py`; `null` or absent: off)"
            _render_section(name, model, note, out)
    return "\n".join(out).rstrip() + "\n"


def _render_section(
    name: str, section: type[pydantic.BaseModel], note: str, out: list[str]
) -> None:
    out.append(f"### `{name}`{note}")
    out.append("")
    if section.__doc__ and not section.__doc__.startswith(("A config section", "Section ")):
        out.append(section.__doc__.strip())
        out.append("")
    _render_model(section, name, out)
    out.append("")


def render_json_schema() -> str:
    """The JSON Schema of `config/config.json`: the core sections and one per
    discovered procedure (a null or absent section turns it off); any other
    top-level key is an error, as `ivy config check` says."""
    schema: dict[str, Any] = Config.model_json_schema()
    definitions: dict[str, Any] = schema.setdefault("$defs", {})
    for name, model in sorted(procedure_sections().items()):
        if model is None:
            continue
        section = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(section.pop("$defs", {}))
        definitions[model.__name__] = section
        schema["properties"][name] = {
            "anyOf": [{"$ref": f"#/$defs/{model.__name__}"}, {"type": "null"}],
            "default": None,
            "description": f"Procedure src/procedures/{name}.py; null or absent: off.",
        }
    schema["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
