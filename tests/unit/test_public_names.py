"""Every role lists its few public names the same way: ``public_names`` in its ``__init__.py``.

Read from the source (nothing is imported, so no role's dependencies are needed): the package
file holds a docstring, the imports and one ``public_names`` call; every name is defined at the
top of the module it names; and no name is also a submodule's (importing that submodule would
replace the name with the module).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("protocol", "runtime", "device", "cloud", "converter", "auditor", "deploy", "edgesplit")


def _names(role: str) -> dict[str, str]:
    tree = ast.parse((ROOT / role / "__init__.py").read_text())
    body = tree.body[1:] if ast.get_docstring(tree) else tree.body
    calls = []
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module in ("__future__", "protocol.public"):
            continue
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
            and getattr(node.value.func, "id", None) == "public_names", \
            f"{role}/__init__.py line {node.lineno}: only imports and one public_names(...) call belong here"
        assert [ast.unparse(t) for t in node.targets] == ["(__all__, __getattr__, __dir__)"]
        calls.append(node.value)
    assert len(calls) == 1, f"{role}/__init__.py: one public_names(__name__, {{...}}) call"
    return ast.literal_eval(calls[0].args[1])


def _defined(path: Path) -> set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
    return out


def _module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@pytest.mark.parametrize("role", ROLES)
def test_a_role_lists_its_public_names_once_and_each_is_where_it_says(role):
    names = _names(role)
    assert 0 < len(names) <= 40, f"{role}: a role's public names are few"
    submodules = {p.stem for p in (ROOT / role).glob("*.py")} | {p.parent.name for p in (ROOT / role).glob("*/__init__.py")}
    for name, module in names.items():
        assert module.split(".")[0] == role, f"{role}.{name} comes from another role: {module}"
        if module == f"{role}.{name}":
            assert name in submodules, f"{role}.{name}: no such module"
            continue
        assert name not in submodules, f"{role}.{name} is also a submodule's name: importing it would shadow the name"
        assert _module_file(module).is_file(), f"{role}.{name}: no module {module}"
        assert name in _defined(_module_file(module)), f"{role}.{name}: {module} does not define it"


def test_the_names_load_their_module_on_first_use_only():
    probe = ("import sys, cloud, protocol\n"
             "assert 'cloud.worker' not in sys.modules and 'protocol.frame' not in sys.modules\n"
             "assert 'Worker' in dir(cloud) and 'Worker' in cloud.__all__\n"
             "from cloud import DedupeWindow\n"
             "assert 'cloud.dedupe' in sys.modules and 'cloud.worker' not in sys.modules\n"
             "assert protocol.errors.UsageError is protocol.UsageError\n"
             "try:\n    cloud.Nothing\nexcept AttributeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'cloud' has no attribute 'Nothing'"
