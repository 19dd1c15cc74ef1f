"""The report's settings table says what a defaulted option meant, never a bare None."""
from types import SimpleNamespace

from auditor.report import _setting_text


def test_defaulted_settings_are_spelled_out():
    result = SimpleNamespace(cuts=[SimpleNamespace(name="conv1"), SimpleNamespace(name="dense2")])
    assert _setting_text("cuts", None, result) == "every valid cut: conv1, dense2"
    assert _setting_text("tv", None, result) == "grows with depth"
    assert _setting_text("max_bytes", None, result) == "no budget"
    assert _setting_text("n", 10000, result) == "10000"
    assert "None" not in _setting_text("some_new_option", None, result)
