"""DESIGN §1: constants -> types -> utils -> procedures/backend -> main; a module
never imports from a layer to its right, and procedures and backends never
import each other. A package's `__main__` (run with `python -m`, imported by
nothing) counts as the top layer. No cycles either, not even inside a layer
and not through an import inside a function (imports under `if TYPE_CHECKING:`
never run and do not count)."""

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


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:`."""
    found: list[ast.AST] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                pending.extend(child.orelse)
                continue
            pending.append(child)
    return found


def imports_of(path: str, module: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    found: list[str] = []
    for node in _runtime_nodes(tree):
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


def modules_of(project_dir: str) -> dict[str, str]:
    """module name -> path, for every module under src/."""
    found = {}
    for directory, _, files in os.walk(os.path.join(project_dir, "src")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, project_dir)[:-3].replace(os.sep, ".")
                found[relative.removesuffix(".__init__")] = path
    return found


def find_cycles(project_dir: str) -> list[list[str]]:
    """The import cycles among src's modules (strongly connected components
    of the import graph with more than one module, or a module importing
    itself), each sorted."""
    modules = modules_of(project_dir)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for imported in imports_of(path, module):
            if imported in modules and imported not in (module, module.rsplit(".", 1)[0]):
                edges.add(imported)
        graph[module] = edges
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles_inside_or_across_layers() -> None:
    assert find_cycles(PROJECT_DIR) == []


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Any) -> None:
    (tmp_path / "src" / "utils").mkdir(parents=True)
    (tmp_path / "src" / "utils" / "a.py").write_text("from .b import x\n")
    (tmp_path / "src" / "utils" / "b.py").write_text("def f():\n    from src.utils import a\n")
    (tmp_path / "src" / "utils" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n"
    )
    (tmp_path / "src" / "utils" / "d.py").write_text("from .c import z\n")
    assert find_cycles(str(tmp_path)) == [["src.utils.a", "src.utils.b"]]
