"""Every payload in tests/data/hostile_frames is refused with the FrameError its note expects."""
import json
from pathlib import Path

import pytest

from protocol import FrameError, FrameLimits, decode_frame

FOLDER = Path(__file__).resolve().parents[1] / "data" / "hostile_frames"
EXPECTED = json.loads((FOLDER / "expected.json").read_text())


def test_every_file_has_a_note_and_every_note_a_file():
    files = {p.name for p in FOLDER.glob("*.bin")}
    assert files == set(EXPECTED)
    assert len(files) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_frame_is_refused_with_a_precise_error(name):
    case = EXPECTED[name]
    key = bytes.fromhex(case["key"]) if "key" in case else None
    if "keys" in case:
        key = {dev: bytes.fromhex(k) for dev, k in case["keys"].items()}
    limits = FrameLimits(**case.get("limits", {}))
    with pytest.raises(FrameError) as info:
        decode_frame((FOLDER / name).read_bytes(), key=key, limits=limits)
    assert case["error"] in str(info.value), case["note"]
    assert info.value.reason == case["reason"], str(info.value)
    assert info.value.fix, "every frame error says what to do"
