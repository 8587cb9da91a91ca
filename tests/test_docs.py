"""The README and the guides in docs/ stay true: the generated config
reference, the two quick-start commands, CI calling the README's test
command, the tested procedure example, and every guide the README links."""

from __future__ import annotations

import json
import os
import re

import pytest

from src.utils.config_reference import render_config_reference, render_json_schema
from tests.conftest import PROJECT_DIR

pytestmark = pytest.mark.quick


def read(*parts: str) -> str:
    with open(os.path.join(PROJECT_DIR, *parts)) as f:
        return f.read()


def test_config_reference_in_the_docs_is_the_generated_one() -> None:
    reference = read("docs", "config-reference.md")
    match = re.search(
        r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", reference, re.S
    )
    assert match is not None
    assert match.group(1) == render_config_reference(), "run: ivy config reference"


def test_every_config_field_is_described() -> None:
    reference = render_config_reference()
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)


def test_quick_start_commands_exist_and_ci_runs_the_test_command() -> None:
    readme = read("README.md")
    assert "bash .ci/setup && .venv/bin/ivy config init && .venv/bin/ivy start" in readme
    assert "\nbash .ci/test\n" in readme
    assert "bash .ci/test" in read(".ci", "run")


def test_the_procedure_guide_shows_the_tested_example() -> None:
    guide = read("docs", "procedures.md")
    match = re.search(r"<!-- procedure-example:start -->\n```python\n(.*?)```\n", guide, re.S)
    assert match is not None
    assert match.group(1) == read("tests", "reference_procedure.py")


def test_the_json_schema_for_editors_is_the_generated_one() -> None:
    assert read("config", "config.schema.json") == render_json_schema(), (
        "run: ivy config schema > config/config.schema.json"
    )
    schema = json.loads(render_json_schema())
    assert schema["additionalProperties"] is False
    assert {"general", "backend", "dummy_procedure", "system_checks"} <= set(schema["properties"])


def test_every_guide_the_readme_links_exists_and_every_guide_is_linked() -> None:
    readme = read("README.md")
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]+)?\)", readme))
    present = {f"docs/{name}" for name in os.listdir(os.path.join(PROJECT_DIR, "docs"))}
    assert linked == present
    assert len(readme.splitlines()) < 120  # the front door, not the manual
