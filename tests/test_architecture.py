"""The package's layers only point down: every import of a sed_lens module (function-local and type-checking ones
included) goes to the same or a lower floor, and no files or folders import each other in a circle.

The floors, bottom to top (docs/ARCHITECTURE.md says what lives where and why):"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sed_lens"

FLOORS: dict[str, int] = {
    # 0 — the ground: no torch model code, no other sed_lens module but errors
    "sed_lens.errors": 0, "sed_lens.configs": 0, "sed_lens.devices": 0, "sed_lens.torch_reference": 0,
    "sed_lens.cli": 0, "sed_lens.wandb_offline": 0,
    # 1 — data and bookkeeping
    "sed_lens.task": 1, "sed_lens.induction": 1,
    "sed_lens.tasks": 1, "sed_lens.subspace": 1, "sed_lens.tracking": 1, "sed_lens.serialization": 1,
    # 2 — models, 3 — the training engine
    "sed_lens.models": 2,
    "sed_lens.training": 3,
    # 4 — pure analysis of model states and trajectories
    "sed_lens.analysis": 4,
    # 5 — training callbacks built on the analysis
    "sed_lens.hooks": 5,
    # 6 — services that know nothing of any experiment
    "sed_lens.plots": 6, "sed_lens.grid": 6, "sed_lens.rendering": 6,
    # 7 — experiments: thin compositions, each owning its report section
    "sed_lens.experiments": 7,
    # 8 — reading back what experiments wrote, and the package's front door
    "sed_lens.loading": 8, "sed_lens.report": 8, "sed_lens": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    """The floor of a module: its own entry, else its folder's (``sed_lens.analysis.sed`` → ``sed_lens.analysis``)."""
    name = module
    while name not in FLOORS:
        if name.count(".") < 2:  # a module at the package root needs its own entry (the root is the front door)
            raise KeyError(module)
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def folder_of(module: str) -> str:
    """The folder of a module in a sub-package (``sed_lens.analysis.sed`` → ``sed_lens.analysis``); a module at the
    package root is its own room (the root holds both the ground floor and the front door)."""
    parent = module.rsplit(".", 1)[0]
    return parent if parent != "sed_lens" and "." in module and MODULES[module].name != "__init__.py" else module


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The sed_lens modules (files) an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                pkg = pkg.rsplit(".", 1)[0]
            base = f"{pkg}.{base}" if base else pkg
        # ``from pkg import sub`` loads the submodule ``pkg.sub`` when it is one, else pkg itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for n in names:
        while n and n not in MODULES:  # ``import sed_lens.analysis.sed.x`` → the deepest module that exists
            n = n.rsplit(".", 1)[0] if "." in n else ""
        if n.startswith("sed_lens"):
            out.append(n)
    return out


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[mod] = {t for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                      for t in resolve(mod, node) if t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


GRAPH = imports()


def test_every_module_has_a_floor():
    missing = []
    for m in MODULES:
        try:
            floor_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"give these modules a floor in FLOORS (and docs/ARCHITECTURE.md): {missing}"


def test_no_import_points_up():
    up = sorted(f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
                for a, targets in GRAPH.items() for b in targets if floor_of(b) > floor_of(a))
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_no_files_import_each_other_in_a_circle():
    assert not cycles(GRAPH), f"import circles between files: {cycles(GRAPH)}"


def test_no_folders_import_each_other_in_a_circle():
    folders: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        fa = folder_of(a)
        folders.setdefault(fa, set()).update(folder_of(b) for b in targets if folder_of(b) != fa)
    assert not cycles(folders), f"import circles between folders: {cycles(folders)}"


@pytest.mark.parametrize("source, expected", [
    ("from sed_lens.analysis import sed", ["sed_lens.analysis.sed"]),
    ("from sed_lens import errors", ["sed_lens.errors"]),
    ("from .sed import RollingSED", ["sed_lens.analysis.sed"]),
    ("from .. import errors", ["sed_lens.errors"]),
    ("import sed_lens.analysis.sed", ["sed_lens.analysis.sed"]),
    ("import numpy", []),
])
def test_the_walker_resolves_every_import_form(source, expected):
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Import | ast.ImportFrom)
    assert resolve("sed_lens.analysis.coupling", node) == expected


def test_a_root_module_without_a_floor_is_caught():
    with pytest.raises(KeyError):
        floor_of("sed_lens.new_service")
    assert floor_of("sed_lens.analysis.new_module") == FLOORS["sed_lens.analysis"]


def test_the_checks_catch_an_upward_import_and_a_circle():
    graph = {"sed_lens.models": {"sed_lens.report"}, "sed_lens.report": {"sed_lens.models"}}
    assert cycles(graph) == [["sed_lens.models", "sed_lens.report"]]
    assert floor_of("sed_lens.report") > floor_of("sed_lens.models")
