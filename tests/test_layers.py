"""The package's layers, checked from its imports (module level and inside functions alike).

Bottom to top: leaves (registry, assets, kernels, testing) → noise → solvers → models → data → objectives → config →
train → plan → export → eval → cli. A module may import its own package or any lower layer, never a higher one, and no
two modules may import each other, directly or around a longer circle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fewstep"
LAYERS = [
    ("registry", "assets", "kernels", "testing"),
    ("noise",),
    ("solvers",),
    ("models",),
    ("data",),
    ("objectives",),
    ("config",),
    ("train",),
    ("plan",),
    ("export",),
    ("eval",),
    ("cli", "__main__"),
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``fewstep.*`` module ``path`` imports, anywhere in the file (``from fewstep.x import y`` counts
    ``fewstep.x.y`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fewstep"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fewstep"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fewstep"


def test_every_subpackage_has_a_layer():
    assert {layer_of(m) for m in MODULES} - {"fewstep"} <= set(LEVEL), sorted({layer_of(m) for m in MODULES})


def test_no_import_runs_up_a_layer():
    upward = []
    for module, targets in sorted(GRAPH.items()):
        if layer_of(module) == "fewstep":
            continue  # the top-level package re-exports the public API
        for target in sorted(targets):
            if layer_of(target) == "fewstep" or layer_of(target) == layer_of(module):
                continue
            if LEVEL[layer_of(target)] > LEVEL[layer_of(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_two_modules_import_each_other():
    """No circle of any length between modules (Tarjan's strongly connected components)."""
    edges = defaultdict(set)
    for module, targets in GRAPH.items():
        for target in targets:
            if target in MODULES and target != module and not module.startswith(target + "."):
                # importing a parent package runs its __init__, which may re-export the child: not a circle of files
                edges[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not circles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in circles)
