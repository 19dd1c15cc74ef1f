"""The rejection reasons are one closed list: protocol.errors.Reason, the table in
docs/frame-format.md, and the code that refuses frames all name the same codes."""
from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest

from protocol.errors import FrameError, Reason

ROOT = Path(__file__).resolve().parents[2]
# who gives a reason (Reason.where) -> the files that refuse frames on its behalf
GIVERS = {"codec": ("protocol/frame.py", "protocol/fields.py"), "signing": ("protocol/signing.py",),
          "registry": ("cloud/registry.py",), "worker": ("cloud/worker.py",)}


def doc_table() -> dict[str, tuple[str, ...]]:
    """reason -> given by, from the table under '## Rejection reasons' in docs/frame-format.md."""
    text = (ROOT / "docs" / "frame-format.md").read_text(encoding="utf-8")
    section = text.split("## Rejection reasons", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| ([a-z, ]+) \|", section, flags=re.M)
    assert rows, "no table under '## Rejection reasons' in docs/frame-format.md"
    table = {code: tuple(w.strip() for w in where.split(",")) for code, where in rows}
    assert len(table) == len(rows), "a reason has two rows in the doc's table"
    return table


def test_the_enum_and_the_docs_table_list_the_same_reasons_given_by_the_same_parts():
    assert doc_table() == {r.value: r.where for r in Reason}


def test_every_reason_in_the_decoding_order_table_is_in_the_enum():
    text = (ROOT / "docs" / "frame-format.md").read_text(encoding="utf-8")
    section = text.split("## Decoding order and errors", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z]+(?:-[a-z]+)+|[a-z]+)`", " ".join(
        ln.split("|")[2] for ln in section.splitlines() if ln.startswith("| ") and ln.count("|") >= 4)))
    named.discard("reason")
    assert named and named <= {r.value for r in Reason}, named - {r.value for r in Reason}


def _raised(path: Path) -> tuple[set[str], list[str]]:
    """Reason members a module passes to FrameError, and FrameError calls that pass something else."""
    members, others = set(), []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FrameError":
            first = node.args[0] if node.args else None
            if (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                    and first.value.id == "Reason"):
                members.add(first.attr)
            else:
                others.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Reason"):
            members.add(node.attr)          # e.g. the worker's dead letters for a topic it cannot parse
    return members, others


@pytest.mark.parametrize("where", sorted(GIVERS))
def test_each_part_gives_exactly_the_reasons_the_enum_says_it_gives(where):
    used, others = set(), []
    for rel in GIVERS[where]:
        m, o = _raised(ROOT / rel)
        used |= m
        others += o
    assert not others, f"FrameError raised without a Reason member at {others}"
    assert used == {r.name for r in Reason if where in r.where}


def test_nothing_else_in_the_tree_refuses_frames_with_its_own_codes():
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in ("tests", ".venv", "build") or ".venv" in path.parts:
            continue
        _, others = _raised(path)
        assert not others, f"FrameError raised without a Reason member at {others}"


def test_a_reason_is_its_code_wherever_it_is_written():
    err = FrameError(Reason.BAD_MAC, "bad MAC: altered", fix="check the key")
    assert err.reason == "bad-mac" and f"{err.reason}" == "bad-mac" and str(err.reason) == "bad-mac"
    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, again.message, again.fix) == (Reason.BAD_MAC, "bad MAC: altered", "check the key")


def test_the_list_is_closed():
    with pytest.raises(TypeError, match="Reason"):
        FrameError("bad-mac", "a reason spelled as a plain string")
    with pytest.raises(ValueError):
        Reason("bad-macc")
