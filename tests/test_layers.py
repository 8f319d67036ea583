"""The core's layering: every module sits in one room (a subpackage) and imports only from the rooms its room may
use, function-level imports included; no import cycles; no built-in plugin named by the core; a light
``import eedn``.

Cycles are read from module-level imports (and ``if TYPE_CHECKING:`` blocks): a function-level import defers a
heavy dependency, which is fine inside the allowed rooms. The room rule reads every import, wherever it stands.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eedn"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run at import time or read by type checkers: module level, inside top-level
    ``if``/``try`` blocks (``if TYPE_CHECKING:`` included), never inside functions or classes."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                walk(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)

    walk(tree.body)
    return found


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function-level ones included."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    """eedn module -> the eedn modules it imports (``from eedn.core import x`` names module ``eedn.core.x`` when
    that is a module, else the package itself); module-level imports only unless ``everywhere``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in (all_imports(tree) if everywhere else top_level_imports(tree)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level:
                raise AssertionError(f"{path}: relative import; eedn modules import each other by full name")
            else:
                targets = [node.module or ""]
            for target in targets:
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules] \
                    if isinstance(node, ast.ImportFrom) else []
                if subs:
                    edges.update(subs)
                elif target in modules:
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse(textwrap.dedent("""
        import os
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from eedn.core.model import EarlyExitModel
        def f():
            from eedn.pipeline.run import run_pipeline
    """))
    assert [getattr(n, "module", None) for n in top_level_imports(tree)] == [None, "typing", "eedn.core.model"]


def test_no_import_cycles_among_eedn_modules():
    graph = import_graph()
    assert "eedn.cli.main" in graph and "eedn.runtime.errors" in graph  # the graph really holds the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (module level or TYPE_CHECKING): " + " -> ".join(cycle)


#: the rooms, bottom up, and the rooms each may import from (its own always included). docs/plugins.md and the
#: subpackages' docstrings say what each room is for.
ROOMS: dict[str, set[str]] = {
    "runtime": set(),
    "core": {"runtime"},
    "train": {"core", "runtime"},
    "evaluation": {"core", "runtime"},
    "report": {"evaluation", "core", "runtime"},
    "pipeline": {"train", "evaluation", "report", "core", "runtime"},
    "deploy": {"pipeline", "report", "evaluation", "core", "runtime"},
    "cli": {"deploy", "pipeline", "train", "evaluation", "report", "core", "runtime"},
}
#: modules outside the rooms: the facade (it names the public API lazily) and ``python -m eedn``
FACADE = {"eedn", "eedn.__main__"}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a module in a room its own room may not use (the facade may not be
    imported by any room: ``__version__`` lives in eedn.runtime)."""
    bad = []
    for module, targets in graph.items():
        here = room_of(module)
        if module in FACADE:
            continue
        assert here is not None, f"{module} sits in no room: move it into one of {', '.join(ROOMS)}"
        for target in sorted(targets):
            there = room_of(target)
            if there is None or (there != here and there not in ROOMS[here]):
                bad.append(f"{module} ({here}) -> {target} ({there or 'facade'})")
    return bad


def test_room_rule_catches_a_crossing_and_a_facade_import():
    graph = {"eedn.core.model": {"eedn.runtime.io", "eedn.pipeline.run"}, "eedn.train.strategy": {"eedn"},
             "eedn.cli.main": {"eedn.pipeline.run", "eedn.deploy.export"}}
    assert room_violations(graph) == ["eedn.core.model (core) -> eedn.pipeline.run (pipeline)",
                                      "eedn.train.strategy (train) -> eedn (facade)"]


def test_every_module_imports_only_from_allowed_rooms_function_level_included():
    graph = import_graph(everywhere=True)
    assert "eedn.core.contracts" in graph and "eedn.runtime.errors" in graph
    assert room_violations(graph) == []


def plugin_references(tree: ast.Module) -> list[str]:
    """Imports of, and string constants naming, the built-in plugin package (docstrings and comments,
    which may explain how plugins are found, are not code)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    refs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            refs += [a.name for a in node.names if a.name.split(".")[0] == "eedn_plugins"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "eedn_plugins":
            refs.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and "eedn_plugins" in node.value:
            refs.append(node.value)
    return refs


def test_core_never_names_a_builtin_plugin_module():
    sample = ast.parse('"""eedn_plugins in a docstring is prose."""\nimport eedn_plugins.jei\nX = "eedn_plugins:y"')
    assert plugin_references(sample) == ["eedn_plugins.jei", "eedn_plugins:y"]
    offenders = {p.name: refs for p in sorted(PACKAGE.rglob("*.py"))
                 if (refs := plugin_references(ast.parse(p.read_text(), str(p))))}
    assert offenders == {}, f"eedn/ modules naming the built-in plugin package: {offenders}"


LIGHT = """
import sys
import eedn, eedn.cli.main, eedn.core.plugins, eedn.core.options, eedn.runtime.errors, eedn.core.hookspecs, eedn.cli.common
from eedn.core.plugins import KINDS, list_names
names = {kind: list_names(kind) for kind in KINDS}
assert all(names.values()), names
heavy = sorted(m for m in ("torch", "torchvision", "timm", "numpy", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def test_import_eedn_and_listing_plugins_import_no_torch():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, f"imported: {out.stdout.strip()}"


@pytest.mark.parametrize("args, shown", [(["--help"], "Usage: eedn [OPTIONS] COMMAND"),
                                         (["plugins"], "eedn plugins (`eedn plugins NAME`"),
                                         (["run", "--help"], "Usage: eedn run [OPTIONS]")])
def test_cli_start_imports_no_torch(args, shown):
    probe = ("import sys, atexit; atexit.register(lambda: print('TORCH=%d' % ('torch' in sys.modules)));"
             "sys.argv = ['eedn'] + sys.argv[1:]; from eedn.cli.main import main; main()")
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert shown in out.stdout, out.stdout[:300]
    assert out.stdout.strip().endswith("TORCH=0"), "the command imported torch"
