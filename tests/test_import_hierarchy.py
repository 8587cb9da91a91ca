"""DESIGN §1: constants -> types -> utils -> procedures/backend -> main; a module
never imports from a layer to its right, and procedures and backends never
import each other. A package's `__main__` (run with `python -m`, imported by
nothing) counts as the top layer."""

from __future__ import annotations

import ast
import os
from typing import Any

import pytest

from tests.conftest import PROJECT_DIR

pytestmark = pytest.mark.quick

LAYERS = {"constants": 0, "types": 1, "utils": 2, "procedures": 3, "backend": 3, "main": 4}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "src" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def imports_of(path: str, module: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]
    return found


def find_violations(project_dir: str) -> list[str]:
    violations = []
    for directory, _, files in os.walk(os.path.join(project_dir, "src")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, project_dir)[:-3].replace(os.sep, ".")
            module = relative.removesuffix(".__init__")
            # `python -m src.x` entry points are programs, never imported: they
            # stand on top, like the main loop
            own = "main" if module.endswith(".__main__") else layer_of(module)
            if own is None:
                continue
            for imported in imports_of(path, module):
                other = layer_of(imported)
                if other is not None and other != own and LAYERS[other] >= LAYERS[own]:
                    violations.append(f"{module} imports {imported}")
    return violations


def test_no_module_imports_upwards_or_sideways() -> None:
    assert find_violations(PROJECT_DIR) == []


def test_the_checker_finds_upward_relative_and_sideways_imports(tmp_path: Any) -> None:
    for package in ("types", "utils", "procedures", "backend"):
        (tmp_path / "src" / package).mkdir(parents=True)
    (tmp_path / "src" / "types" / "bad.py").write_text("from src.utils import logger\n")
    (tmp_path / "src" / "utils" / "bad.py").write_text("from ..main import run\n")
    (tmp_path / "src" / "procedures" / "bad.py").write_text("import src.backend.tenta\n")
    (tmp_path / "src" / "utils" / "good.py").write_text("from src.types import Config\n")
    assert sorted(find_violations(str(tmp_path))) == [
        "src.procedures.bad imports src.backend.tenta",
        "src.types.bad imports src.utils",
        "src.types.bad imports src.utils.logger",
        "src.utils.bad imports src.main",
        "src.utils.bad imports src.main.run",
    ]
