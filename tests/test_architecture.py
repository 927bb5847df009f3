"""The import rules of docs/architecture.md, read from the source with `ast`: collab_env never imports
agents, neither package has an import cycle, project modules are imported at the top of a file (an
import inside a function is for an optional or heavy third-party package only), no module reaches
into another's private names, and no file grows past ~400 lines."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 420
LATE_BY_DESIGN = {
    ("collab_env.features", "collab_env.decoding"): "decoding loads torch and transformers (~2.5 s), which a "
    "routing env whose device answers are cached never needs",
}
"""The imports of a project module inside a function that are not there to dodge a cycle, and why."""

Edge = tuple[str, str, bool]
"""(imported project module, imported name or "", whether the import is inside a function)."""


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_edges(module: str, modules: dict[str, Path]) -> list[Edge]:
    """Every import of a project module in `module`, relative imports resolved."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((t, "", in_function) for a in child.names if (t := owner(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = parts[: len(parts) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    target = owner(f"{base}.{alias.name}") or owner(base)
                    if target:
                        found.append((target, alias.name, in_function))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), False)
    return [edge for edge in found if edge[0] != module]


def find_cycles(graph: dict[str, list[Edge]]) -> list[str]:
    """Import cycles found by depth-first search, each as 'a -> b -> a'."""
    state: dict[str, str] = {}
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target, _, _ in graph[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target, [*path, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            walk(module, [module])
    return cycles


def late_imports(graph: dict[str, list[Edge]], allowed: Iterable[tuple[str, str]] = ()) -> list[str]:
    allowed = set(allowed)
    return [
        f"{m} imports {t} inside a function"
        for m, edges in graph.items()
        for t, _, inner in edges
        if inner and (m, t) not in allowed
    ]


MODULES = find_modules(REPO, ("collab_env", "agents"))
GRAPH = {module: import_edges(module, MODULES) for module in MODULES}


def test_the_environment_side_never_imports_the_learning_side() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, edges in GRAPH.items()
        if module.startswith("collab_env")
        for target, _, _ in edges
        if target.startswith("agents")
    ]
    assert not offenders


def test_no_import_cycle() -> None:
    assert not find_cycles(GRAPH)


def test_project_modules_are_imported_at_the_top() -> None:
    assert not late_imports(GRAPH, LATE_BY_DESIGN)


def test_no_module_imports_private_names_of_another() -> None:
    private = [
        f"{module} imports {target}.{name}"
        for module, edges in GRAPH.items()
        for target, name, _ in edges
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_short(module: str) -> None:
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it by job"


def test_the_checks_catch_a_cycle_and_an_import_inside_a_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import low\n")
    (package / "sub" / "low.py").write_text("def f():\n    from pkg.high import g\n")
    (package / "high.py").write_text("from pkg.sub.low import f\nfrom .sub import low as _unused\n")
    modules = find_modules(tmp_path, ("pkg",))
    graph = {module: import_edges(module, modules) for module in modules}
    assert graph["pkg.sub"] == [("pkg.sub.low", "low", False)]
    assert ("pkg.sub.low", "low", False) in graph["pkg.high"]
    assert find_cycles(graph) == ["pkg.high -> pkg.sub.low -> pkg.high"]
    assert late_imports(graph) == ["pkg.sub.low imports pkg.high inside a function"]
