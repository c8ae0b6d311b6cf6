"""The house's layering, read from its own sources: the layers import downwards only —
``bmc.contract``/``bmc.card`` (and the other ``bmc`` core modules) → ``bmc.edge_app`` →
``bmc.train`` → ``bmc.convert`` → ``bmc.benchmarks`` → ``bmc.cli`` — and no module imports itself
back through others (a cycle), counting imports inside functions too."""

from __future__ import annotations

import ast
import sys

from conftest import ROOT

# the folders and the import names they install as ([tool.setuptools.package-dir])
PACKAGES = {
    "bmc": "bmc",
    "edge_app": "bmc.edge_app",
    "train": "bmc.train",
    "convert": "bmc.convert",
    "benchmarks": "bmc.benchmarks",
}
LAYERS = ["bmc.edge_app", "bmc.train", "bmc.convert", "bmc.benchmarks", "bmc.cli"]  # bottom to top; the core below all


def _modules() -> dict[str, ast.Module]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([name, *parts])] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "bmc" or m.startswith("bmc.")}


def _layer(module: str) -> int:
    for k, top in enumerate(LAYERS, start=1):
        if module == top or module.startswith(top + "."):
            return k
    return 0


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for m, tree in mods.items():
        targets = set()
        for t in _imports(tree):
            while t not in mods and "." in t:  # a name imported from a module: the module
                t = t.rsplit(".", 1)[0]
            if t in mods and t != m:
                targets.add(t)
        graph[m] = targets
    return graph


def test_the_layers_import_downwards_only():
    up = [f"{m} imports {t}" for m, ts in _graph().items() for t in sorted(ts) if _layer(t) > _layer(m)]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_no_module_imports_itself_back():
    graph = _graph()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    cycles, done, path = [], set(), []

    def visit(m):
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if t in path:
                cycles.append(" → ".join(path[path.index(t) :] + [t]))
            elif t not in done:
                visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        if m not in done:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_the_tree():
    """The graph holds the modules the README names, with the edges one knows are there."""
    graph = _graph()
    assert {"bmc.contract", "bmc.card", "bmc.edge_app.app", "bmc.train.trainer", "bmc.cli.edge"} <= set(graph)
    assert "bmc.contract" in graph["bmc.edge_app.app"] and "bmc.edge_app.app" in graph["bmc.cli.edge"]
