"""The package's shape: no import cycles (imports inside functions count), short functions, and
notebooks that call the package instead of defining functions of their own.

The checks read the source with ``ast``, so they see imports that a test run would not
execute. Every module of the package and every notebook is held to them.
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import pytest

import cxrlib

PACKAGE = Path(cxrlib.__file__).resolve().parent
MAX_FUNCTION_LINES = 80


@functools.cache
def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, source: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The ``modules`` that module ``name`` imports anywhere in its ``source`` (relative or absolute)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from . import x`` imports module x; ``from .x import y`` imports module x (and y if a module)
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return (found & modules) - {name}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {
        name: imported_modules(name, path.read_text(), set(files), path.name == "__init__.py")
        for name, path in files.items()
    }


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycle_through(graph: dict[str, set[str]], module: str) -> list[str]:
    """One import cycle that passes through ``module`` (empty when there is none)."""
    paths = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop(0)
        for nxt in sorted(graph[current]):
            if nxt == module:
                return [*paths[current], module]
            if nxt not in paths:
                paths[nxt] = [*paths[current], nxt]
                todo.append(nxt)
    return []


def long_functions(path: Path, limit: int) -> list[str]:
    return [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= limit
    ]


def test_the_graph_sees_every_kind_of_import_also_inside_functions():
    source = (
        "import cxrlib.a\n"
        "from . import b\n"
        "from .c import name\n"
        "def f():\n"
        "    from .d import name\n"
        "    from ..e import name\n"
    )
    modules = {"cxrlib.a", "cxrlib.b", "cxrlib.c", "cxrlib.d", "cxrlib.e", "cxrlib.pkg.m", "cxrlib.z"}
    assert imported_modules("cxrlib.x", source, modules) == {"cxrlib.a", "cxrlib.b", "cxrlib.c", "cxrlib.d"}
    assert imported_modules("cxrlib.pkg.m", source.replace("..e", ".e"), modules) == {"cxrlib.a"}
    assert "cxrlib.e" in imported_modules("cxrlib.pkg.m", source, modules)
    graph = import_graph()
    assert "cxrlib.index" in graph["cxrlib.cache"]
    assert reachable(graph, "cxrlib.datasets") >= {"cxrlib.index", "cxrlib.labels", "cxrlib.fileio"}
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}, "a") == []


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_import_cycle_passes_through(module):
    graph = import_graph()
    assert module in graph, f"{module} is not a module of the package"
    cycle = cycle_through(graph, module)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_function_is_longer_than_the_limit(module):
    assert long_functions(module_files()[module], MAX_FUNCTION_LINES) == []


@pytest.mark.parametrize("notebook", sorted(PACKAGE.parent.glob("notebooks/*.ipynb")), ids=lambda p: p.stem)
def test_a_notebook_defines_no_function_or_class_of_its_own(notebook):
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    nodes = [node for cell in cells for node in ast.walk(ast.parse("".join(cell["source"])))]
    defined = [
        node.name for node in nodes if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    assert defined == [], f"{notebook.name} defines {defined}: they belong in cxrlib"
