"""The package's layers point down only, and no modules import each other in a circle.

Every import of every module is read from its syntax tree, imports inside functions included. A module
may import a module of a lower layer, or a module of its own unit (the same package, e.g. one method's
folder or ``refine``) as long as that makes no circle. Anything else — an import from a higher layer, or
"sideways" into another unit of the same layer — fails with the file, line and both layers named.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tokenseg"

# low to high; a module belongs to the unit of the longest prefix that matches it
LAYERS: list[tuple[str, ...]] = [
    ("tokenseg.core",),
    ("tokenseg.config",),
    ("tokenseg.data",),
    ("tokenseg.checkpoint",),
    ("tokenseg.models",),
    ("tokenseg.methods",),
    ("tokenseg.maps",),
    ("tokenseg.engine", "tokenseg.refine", "tokenseg.segment", "tokenseg.evaluate"),
    ("tokenseg.pipeline",),
    ("tokenseg.report", "tokenseg.sweep", "tokenseg.wsol"),
    ("tokenseg.commands",),
    ("tokenseg.cli",),
    ("tokenseg.__main__",),
]

# imports still being moved (issue 23): each must disappear, and the test says so when one has
KNOWN = {
}


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit prefix it falls under."""
    best = None
    for i, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (i, unit)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported tokenseg module, line) for every import statement of ``module``."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in MODULES else root for a in node.names]
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != module and t.startswith("tokenseg"):
                found.append((t, node.lineno))
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def unresolved_imports() -> list[str]:
    """``from X import y`` of tokenseg where neither X nor X.y is a module of the package (a relative
    import with a dot too few or too many, which would fail only when the function runs)."""
    bad = []
    for module, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
                if root not in MODULES:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {root} is not a module")
    return bad


def test_every_relative_import_names_a_module():
    bad = unresolved_imports()
    assert not bad, "\n".join(bad)


def test_every_module_has_a_layer():
    for m in MODULES:
        if m != "tokenseg":
            unit_of(m)


def test_imports_point_down_only():
    bad = []
    for m, deps in GRAPH.items():
        if m == "tokenseg":
            continue
        layer, unit = unit_of(m)
        for t, line in deps:
            t_layer, t_unit = unit_of(t)
            if t_layer < layer or t_unit == unit or (m, t) in KNOWN:
                continue
            way = "up" if t_layer > layer else "sideways"
            bad.append(f"{MODULES[m].relative_to(SRC)}:{line}: {m} ({unit}) imports {t} ({t_unit}): points {way}")
    assert not bad, "imports that break the layers:\n" + "\n".join(sorted(bad))
    gone = [k for k in KNOWN if k[1] not in {t for t, _ in GRAPH.get(k[0], [])}]
    assert not gone, f"no longer imported, remove from KNOWN: {gone}"


def test_core_imports_nothing_else_of_tokenseg():
    bad = [f"{m} imports {t}" for m, deps in GRAPH.items() if m.startswith("tokenseg.core")
           for t, _ in deps if not t.startswith("tokenseg.core")]
    assert not bad


def test_config_imports_neither_wsol_nor_methods():
    deps = {t for t, _ in GRAPH["tokenseg.config"]}
    assert not {d for d in deps if d.startswith(("tokenseg.wsol", "tokenseg.methods"))}


def circles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    found = circles(GRAPH)
    assert not found, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_planted_upward_import_and_circle():
    """The checks above can fail: an import from config up into pipeline, and a two-module circle."""
    graph = {m: list(deps) for m, deps in GRAPH.items()}
    graph["tokenseg.config"].append(("tokenseg.pipeline", 1))
    assert unit_of("tokenseg.pipeline")[0] > unit_of("tokenseg.config")[0]
    graph["tokenseg.core.errors"] = [("tokenseg.core.files", 1)]
    assert any({"tokenseg.core.errors", "tokenseg.core.files"} <= set(c) for c in circles(graph))


@pytest.mark.parametrize("module", ["tokenseg.config", "tokenseg.core.registry"])
def test_leaf_modules_import_without_the_methods(module):
    """Reading a config does not import a method: the registry loads them by name, on first use."""
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.startswith(('tokenseg.methods', 'tokenseg.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
