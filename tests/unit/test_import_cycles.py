"""No import circle among the project's own modules.

A static walk of every ``import`` in every top-level package (protocol, runtime, device, cloud,
converter, auditor, deploy, edgesplit, bench), the ones inside functions included: a lazy import
keeps a circle from failing at load time but not from tying two modules together, so neither
can be read, tested or moved without the other.  The floors stay one way: protocol at the
bottom, the command on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# every top-level package is walked; these must be among them
ROLES = ("protocol", "runtime", "device", "cloud", "converter", "auditor", "deploy", "edgesplit", "bench")


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module in every top-level package under ``root`` (tests aside)."""
    found = {}
    for init in sorted(root.glob("*/__init__.py")):
        if init.parent.name == "tests":
            continue
        for f in init.parent.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = f
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    mods = modules(root)

    def owner(name: str) -> str | None:
        # ``protocol.errors.UsageError`` is a name in the module ``protocol.errors``
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..y import z
                    base = package[:len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                for a in node.names:  # ``from pkg import sub`` imports the submodule when there is one
                    sub = f"{module}.{a.name}"
                    targets.add(sub if sub in mods else module)
        graph[name] = {t for t in map(owner, targets) if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected group."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan; the project is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(graph, g) for g in groups]


def _circle(graph, group):
    """A concrete path round a strongly connected group, for the failure message."""
    start = min(group)
    path, seen, v = [start], {start}, start
    while True:
        nxt = sorted(w for w in graph[v] if w in group)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [w for w in nxt if w not in seen]
        v = fresh[0] if fresh else nxt[0]
        if v in seen:
            return path[path.index(v):] + [v]
        path.append(v)
        seen.add(v)


def test_the_project_has_no_import_circle():
    graph = import_graph(ROOT)
    top = {m.split(".")[0] for m in graph}
    assert set(ROLES) <= top, f"the walk missed roles: {sorted(set(ROLES) - top)}"
    found = cycles(graph)
    assert found == [], "import circles (move what both sides need to a module lower down):\n" + "\n".join(
        "  " + " -> ".join(c) for c in found)


def test_the_walk_sees_a_circle_made_of_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "role"
    (pkg / "report").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "audit.py").write_text("def run():\n    from role.report import write\n")
    (pkg / "report" / "__init__.py").write_text("def write():\n    from . import plots\n")
    (pkg / "report" / "plots.py").write_text("def plot():\n    from ..audit import TABLE\n")
    (pkg / "table.py").write_text("TABLE = {}\n")
    assert cycles(import_graph(tmp_path)) == [["role.audit", "role.report", "role.report.plots", "role.audit"]]
    (pkg / "report" / "plots.py").write_text("def plot():\n    from ..table import TABLE\n")
    assert cycles(import_graph(tmp_path)) == []
