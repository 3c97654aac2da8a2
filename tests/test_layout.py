"""The package's floor plan, read from its imports (ast, nothing is imported): no circle, no
import from a lower layer (core < adapters < services < cli < lab) to a higher one, and
the layout table of docs/development.md ("may import", and the modules each folder holds)
as the code is."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT
from tests.test_readme import DEVELOPMENT, spans, table

PACKAGE = ROOT / "reconciler"
LAYERS = ("core", "adapters", "services", "cli", "lab")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function."""
    known, graph = modules(), {}
    for name, path in known.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:  # `from reconciler.core import render`: a module
                    whole = f"{node.module}.{alias.name}"
                    found.add(whole if whole in known else node.module)
        graph[name] = {m for m in found if m in known and m != name}
    return graph


def layer(module: str) -> str | None:
    """The folder a module lives in; None for the shared ones (`errors`, `defaults`, `logs`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles(imports()) == []


def test_no_import_runs_up_a_layer():
    up = [
        f"{a} imports {b}"
        for a, targets in imports().items()
        for b in sorted(targets)
        if layer(a) and layer(b) and LAYERS.index(layer(b)) > LAYERS.index(layer(a))
    ]
    assert up == []


def test_shared_modules_import_no_layer():
    shared = [m for m in modules() if m.startswith("reconciler.") and layer(m) is None]
    for m in shared:
        if m != "reconciler.__main__":  # the entry point runs the command line
            assert {layer(t) for t in imports()[m]} <= {None}, m


def test_the_layout_table_says_what_each_folder_imports_and_holds():
    graph, rows = imports(), table(DEVELOPMENT, "| folder | role | may import |")
    for row in rows:
        folder = spans(row[0])[0].rstrip("/")
        allowed = set(LAYERS) if row[2] == "everything" else {folder, *spans(row[2])}
        used = {layer(t) for m in graph if layer(m) == folder for t in graph[m]} - {None}
        assert used <= allowed, f"{DEVELOPMENT}: `{folder}/` may import {row[2]}, imports {used}"
        named = set(spans(row[1]))
        held = {m.rsplit(".", 1)[1] for m in graph if layer(m) == folder and m.count(".") == 2} - {
            "__main__"
        }
        assert held <= named, f"{DEVELOPMENT}: `{folder}/` row lacks {sorted(held - named)}"


MAX_LINES = 800


def test_no_module_is_an_overloaded_room():
    """A module a newcomer can read whole: split by what it does past `MAX_LINES`."""
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 800}
    assert long == {}


def test_the_pass_is_written_once():
    """Only `run_pass` calls `reconcile`: the CLI, a pull round and the daemon go through it
    (lock, secret, epoch, session check, gather, reconcile, epoch file, audit)."""
    callers = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for call in ast.walk(node):
                    func = getattr(call, "func", None)
                    called = getattr(func, "id", None) or getattr(func, "attr", None)
                    if isinstance(call, ast.Call) and called == "reconcile":
                        callers.append(f"{name}.{node.name}")
    assert callers == ["reconciler.services.reconcile.run_pass"]


CLOCKS = {("time", "time"), ("time", "monotonic"), ("datetime", "now"), ("datetime", "utcnow")}
WRITES = {"write_text", "write_bytes", "mkdir", "unlink", "chmod", "touch"}  # Path methods


def test_the_core_reads_no_clock_and_writes_no_file():
    """`reconciler/core` is given the time (`now`) and the caches it may use; it calls no
    clock, no random draw, no environment, and writes nothing through a path."""
    found = []
    for name, path in modules().items():
        if layer(name) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                pair = (node.value.id, node.attr)
                if (
                    pair in CLOCKS
                    or node.value.id in ("random", "secrets")
                    or pair
                    == (
                        "os",
                        "environ",
                    )
                ):
                    found.append(f"{name}: {node.value.id}.{node.attr}")
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr in WRITES:
                found.append(f"{name}: .{func.attr}()")
    assert found == []
