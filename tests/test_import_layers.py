"""edgecompile's modules import only down the stages, and never in a circle: the design's layering, checked on the
source (every `import` and `from ... import`, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "edgecompile"
# low to high: a module may import its own layer and the layers before it, never one after
LAYERS = [
    {"errors", "numerics", "interrupt", "progress", "__init__"},
    {"inputs"},
    {"reference"},
    {"passes"},
    {"families"},
    {"bundle"},
    {"lowering"},
    {"runtime"},
    {"check"},
    {"serve"},
    {"build"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the edgecompile modules it imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgecompile"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    edges[module].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name.startswith("edgecompile"))
    return {m: {t for t in targets if t in modules and t != m} for m, targets in edges.items()}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_module_belongs_to_a_layer():
    for module in imports():
        layer_of(module)


def test_imports_point_down_the_stages():
    upward = sorted(f"{m} -> {t}" for m, targets in imports().items() for t in targets
                    if layer_of(t) > layer_of(m))
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_in_a_circle():
    edges = imports()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            raise AssertionError(" -> ".join(cycle))


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above could fail: a package with a cycle and an upward import is caught."""
    package = tmp_path / "edgecompile"
    (package / "inputs").mkdir(parents=True)
    (package / "build").mkdir()
    (package / "inputs" / "a.py").write_text("from edgecompile.build import b\n")
    (package / "build" / "b.py").write_text("def f():\n    from edgecompile.inputs import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    edges = imports()
    assert edges["edgecompile.inputs.a"] == {"edgecompile.build.b"} and edges["edgecompile.build.b"] == {"edgecompile.inputs.a"}
    assert layer_of("edgecompile.build.b") > layer_of("edgecompile.inputs.a")
