"""The reasons an update is refused are one closed list: protocol.errors.UpdateReason and the table
of docs/fleet.md name the same codes, and the device code gives only members of it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.errors import UpdateError, UpdateReason

ROOT = Path(__file__).resolve().parents[2]


def test_the_enum_and_the_docs_table_list_the_same_reasons():
    text = (ROOT / "docs" / "fleet.md").read_text(encoding="utf-8")
    section = text.split("## Why an update is refused", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert rows and len(rows) == len(set(rows))
    assert set(rows) == {r.value for r in UpdateReason}


def test_an_update_error_takes_only_a_member_and_survives_pickling():
    import pickle

    with pytest.raises(TypeError):
        UpdateError("self-test", "x")
    e = pickle.loads(pickle.dumps(UpdateError(UpdateReason.SELF_TEST, "the head differs", fix="convert again")))
    assert e.reason is UpdateReason.SELF_TEST and e.fix == "convert again" and str(UpdateReason.SELF_TEST) == "self-test"


def test_the_device_and_cloud_code_name_only_members():
    names = {r.name for r in UpdateReason}
    for rel in ("device/update.py", "device/bundles.py", "protocol/announce.py", "protocol/transfer.py",
                "runtime/probe.py", "cloud/updates.py"):
        used = set(re.findall(r"UpdateReason\.([A-Z0-9_]+)", (ROOT / rel).read_text()))
        assert used <= names, (rel, used - names)
