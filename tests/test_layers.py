"""The house's layering, read from its own sources: the layers import downwards only —
``bmc.contract``/``bmc.card`` (and the other ``bmc`` core modules) → ``bmc.edge_app`` →
``bmc.train`` → ``bmc.convert`` → ``bmc.benchmarks`` → ``bmc.cli`` — and no module imports itself
back through others (a cycle), counting imports inside functions too."""

from __future__ import annotations

import ast
import re
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


def _sources() -> dict[str, str]:
    """Each module's source text, by the name it installs as."""
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([name, *parts])] = path.read_text()
    return out


def _modules() -> dict[str, ast.Module]:
    return {m: ast.parse(text, m) for m, text in _sources().items()}


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
    assert {"bmc.contract", "bmc.card", "bmc.edge_app.session", "bmc.train.trainer", "bmc.cli.edge"} <= set(graph)
    assert "bmc.contract" in graph["bmc.edge_app.session"] and "bmc.edge_app.session" in graph["bmc.cli.edge"]


# -- one session-data layer -----------------------------------------------------------------------

SESSION_DB = "bmc.edge_app.sessiondb"
_SQL_CALLS = {"execute", "executemany", "executescript", "backup"}
_SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA)\b", re.I)
# the typed loaders a card or a session's recorded config is read through
_LOADERS = {"bmc.card", "bmc.contract", SESSION_DB}


def _sql_sites(module: str, tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            on = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if on == "sessiondb":  # the layer's own verbs
                continue
            if node.func.attr in _SQL_CALLS or (on == "sqlite3" and node.func.attr == "connect"):
                found.append(f"{module}:{node.lineno} calls .{node.func.attr}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_TEXT.match(node.value):
            found.append(f"{module}:{node.lineno} writes SQL {node.value.strip()[:30]!r}")
    return found


def _card_reads(module: str, tree: ast.Module, source: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("loads", "load")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "json"
        ):
            text = ast.get_source_segment(source, node) or ""
            if "card" in text or (module.startswith("bmc.edge_app") and "config" in text):
                found.append(f"{module}:{node.lineno} {text[:60]}")
    return found


def test_no_sql_outside_the_session_data_module():
    """Only ``edge_app/sessiondb.py`` speaks SQL to a session database: the schema, its migrations
    and every read and write are in one place."""
    found = [s for m, tree in _modules().items() if m != SESSION_DB for s in _sql_sites(m, tree)]
    assert not found, "SQL outside the session-data module:\n" + "\n".join(found)


def test_cards_and_recorded_configs_are_read_through_their_typed_loaders():
    sources = _sources()
    found = [s for m, tree in _modules().items() if m not in _LOADERS for s in _card_reads(m, tree, sources[m])]
    assert not found, "a card or a session config parsed by hand:\n" + "\n".join(found)


def test_the_sql_checks_see_what_they_look_for():
    """The checks find SQL and a hand-parsed card where there is one."""
    tree = ast.parse('db.execute("SELECT 1")\nq = "UPDATE cell SET x = 1"\nsqlite3.connect(p)\n')
    assert len(_sql_sites("m", tree)) == 4  # the call and its text, the text, the connection
    text = "card = json.loads(card_path(p).read_text())\n"
    assert _card_reads("bmc.x", ast.parse(text), text)
    assert _sql_sites(SESSION_DB, _modules()[SESSION_DB])  # the session-data module itself has SQL


def test_no_module_takes_another_modules_private_name():
    """A name with a leading underscore is its module's own: another module that needs it gets a
    public name (``from bmc.x import _y`` is a knot the reader cannot see from ``x``)."""
    found = []
    for m, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bmc"):
                found += [
                    f"{m}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")  # __version__ is public
                ]
    assert not found, "\n".join(found)


def test_the_map_of_tests_names_every_device_module_and_only_real_files():
    """tests/README.md says where the tests of each module are: every module of edge_app/ has a line
    (itself, or its folder), and every test file it names exists."""
    text = (ROOT / "tests" / "README.md").read_text()
    named = set(re.findall(r"`(edge_app/[\w/]+(?:\.py)?)`", text))
    missing = []
    for path in sorted((ROOT / "edge_app").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        folders = {"/".join(rel.split("/")[:k]) + "/" for k in range(2, rel.count("/") + 1)}
        if rel not in named and not (folders & named) and path.name != "__init__.py":
            missing.append(rel)
    assert not missing, "modules with no line in tests/README.md: " + ", ".join(missing)
    files = set(re.findall(r"`(test_\w+\.py)`", text))
    assert files and all((ROOT / "tests" / f).is_file() for f in files), sorted(
        f for f in files if not (ROOT / "tests" / f).is_file()
    )
