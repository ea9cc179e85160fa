"""The shape of the package (docs/architecture.md): no import circles, nothing imports the CLI, every layer
imports only the layers below it, and no module grows past the size rule.

Imports are read from the source with :mod:`ast`, all of them: module level, inside functions and under
``if TYPE_CHECKING`` (a circle of type-only or lazy imports is still a circle for the reader). A module
depends on the module it names: ``from evomerge.zoo import build_zoo`` on ``evomerge.zoo`` (the package's
``__init__``), ``from evomerge.zoo import build`` on ``evomerge.zoo.build``. The parent packages Python
initialises on the way are not counted: every submodule would otherwise depend on its package's
``__init__``, which imports it back.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "evomerge"

# Modules of the package root that any layer may use (and that use no layer).
BASE = frozenset({"evomerge", "errors", "config_util", "progress", "atomic_io"})

# Layer -> the layers it may import (besides itself and BASE), from the flow in docs/architecture.md:
#   checkpoints <- merging <- search_spaces <- optimizer -> evaluators; fusion uses checkpoints, merging and
#   evaluators; the zoo builds models and scores them with the evaluators; the CLI uses everything.
# Two edges beyond the diagram, both in the code today: evaluators -> checkpoints (the vLLM backend reads
# a model directory) and optimizer -> zoo (a sweep with ``zoo:`` builds its zoo when it resolves); the
# latter is why the zoo may not import the optimizer (the two packages would form a circle).
ALLOWED: dict[str, frozenset[str]] = {
    "checkpoints": frozenset(),
    "merging": frozenset({"checkpoints"}),
    "search_spaces": frozenset({"checkpoints", "merging"}),
    "evaluators": frozenset({"checkpoints"}),
    "fusion": frozenset({"checkpoints", "merging", "evaluators"}),
    "zoo": frozenset({"checkpoints", "merging", "search_spaces", "evaluators", "fusion"}),
    "optimizer": frozenset({"checkpoints", "merging", "search_spaces", "evaluators", "zoo"}),
    "cli": frozenset({"checkpoints", "merging", "search_spaces", "evaluators", "fusion", "zoo", "optimizer"}),
}

MAX_LINES = 650
# Modules (or packages of that name) exempt from the size rule: none.
SIZE_EXEMPT: tuple[str, ...] = ()


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    out: dict[str, Path] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(name: str, path: Path) -> Iterator[str]:
    known = modules()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    known = modules()
    return {
        name: frozenset(t for t in _targets(name, path) if t in known and t != name)
        for name, path in known.items()
    }


def layer(module: str) -> str:
    """A module's layer: ``evomerge.optimizer.loop`` -> ``optimizer``, ``evomerge.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_circles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def _describe(circle: list[str]) -> str:
    g = graph()
    members = set(circle)
    return "; ".join(f"{m} -> {', '.join(sorted(g[m] & members))}" for m in circle)


def test_the_circle_finder_finds_circles() -> None:
    edges = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a"}),
        "d": frozenset({"a", "e"}),
        "e": frozenset({"d"}),
        "f": frozenset(),
    }
    assert import_circles(edges) == [["a", "b", "c"], ["d", "e"]]
    assert import_circles({"a": frozenset({"b"}), "b": frozenset()}) == []


def test_the_import_reader_sees_function_local_and_type_checking_imports() -> None:
    g = graph()
    # `from evomerge.zoo import build_zoo` inside a function; the sandbox package's __init__ imports its parts
    assert "evomerge.zoo" in g["evomerge.optimizer.sweep"]
    assert "evomerge.evaluators.sandbox.limits" in g["evomerge.evaluators.sandbox"]
    assert len(g) == len(modules()) > 50


def test_no_import_circles() -> None:
    circles = import_circles(graph())
    assert not circles, "import circles:\n" + "\n".join(_describe(c) for c in circles)


def test_nothing_imports_the_cli() -> None:
    importers = sorted(
        m for m, targets in graph().items() if layer(m) != "cli" and any(layer(t) == "cli" for t in targets)
    )
    assert not importers, f"the CLI is imported by {importers}"


def test_the_layer_table_has_no_circle() -> None:
    table = {name: frozenset(allowed) for name, allowed in ALLOWED.items()}
    assert import_circles(table) == []


def test_layers_import_only_downward() -> None:
    wrong: list[str] = []
    for module, targets in sorted(graph().items()):
        own = layer(module)
        if own not in BASE and own not in ALLOWED:
            wrong.append(f"{module}: layer {own!r} is in neither BASE nor ALLOWED (add it to the table)")
            continue
        for target in sorted(targets):
            other = layer(target)
            if other == own or other in BASE:
                continue
            if own in BASE or other not in ALLOWED[own]:
                wrong.append(f"{module} imports {target} ({own} may not import {other})")
    assert not wrong, "\n".join(wrong)


def test_no_oversized_modules() -> None:
    big = []
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        exempt = any(rel == f"{p}.py" or rel.startswith(f"{p}/") for p in SIZE_EXEMPT)
        if lines > MAX_LINES and not exempt:
            big.append(f"{rel}: {lines} lines")
    assert not big, f"over {MAX_LINES} lines (split by job): {big}"
