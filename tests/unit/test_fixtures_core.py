"""tests/fixtures_core.require: a missing core component skips a developer's test and fails CI's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import fixtures_core
from fixtures_core import CORE, require

TESTS = Path(__file__).resolve().parents[1]


def test_a_missing_component_skips_with_its_name_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setitem(fixtures_core._FIND, "mosquitto",
                        lambda: (None, "the mosquitto binary is not installed: sudo apt-get install mosquitto"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="mosquitto is missing: .*apt-get install mosquitto"):
        require("mosquitto")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="mosquitto is missing under CI=true.*apt-get install mosquitto"):
        require("mosquitto")


def test_a_present_component_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(fixtures_core._FIND, "mnist", lambda: ("the dataset", None))
    assert require("mnist") == "the dataset"
    with pytest.raises(ValueError, match="known: mosquitto"):
        require("mosquito")


def test_every_skip_for_a_core_component_goes_through_require():
    # a test that skipped by itself on a missing Mosquitto, TensorFlow, LiteRT or MNIST would pass under CI
    core = r"mosquitto|tensorflow|keras|litert|tflite|mnist"
    by_hand = re.compile(rf"importorskip\(\s*[\"'](?:{core})|skip(?:if)?\([^\n]*(?:{core})", re.I)
    found = [f"{p.relative_to(TESTS)}:{text[:m.start()].count(chr(10)) + 1}"
             for p in sorted(TESTS.rglob("*.py")) if p.name not in ("fixtures_core.py", Path(__file__).name)
             for text in [p.read_text()] for m in by_hand.finditer(text)]
    assert found == [], f"skips of core components not through fixtures_core.require ({', '.join(CORE)}): {found}"
