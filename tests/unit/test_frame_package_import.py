"""The protocol package loads its heavy modules only when they are used.

A device whose numpy (or msgspec) is missing or broken must still import the
errors, so that ``edgesplit doctor`` can run and say what is missing.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("numpy", "msgspec", "zstandard", "protocol.frame")


def loaded_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which heavy modules it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import protocol.errors",
    "from protocol import FrameError, UsageError, ConfigError",
    "import protocol.signing",
])
def test_errors_and_signing_import_without_numpy_or_msgspec(code):
    assert loaded_after(code) == []


def test_a_device_without_numpy_can_still_import_the_errors():
    # a meta-path finder that refuses numpy stands in for a Pi where it is not installed
    code = ("import sys\n"
            "class NoNumpy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'numpy':\n"
            "            raise ImportError('numpy is not installed')\n"
            "sys.meta_path.insert(0, NoNumpy())\n"
            "from protocol.errors import ConfigError\n"
            "try:\n"
            "    from protocol import Frame\n"
            "except ImportError as e:\n"
            "    print('Frame needs numpy:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert "Frame needs numpy: numpy is not installed" in out.stdout


def test_public_names_still_import_from_the_package():
    assert "protocol.frame" in loaded_after("from protocol import Frame")
    import protocol
    from protocol import Frame, ReplayWindow, decode_frame, topics  # noqa: F401
    from protocol import manifest  # a submodule that is not in the lazy table still imports
    from protocol.frame import Frame as Direct
    assert Frame is Direct and topics.__name__ == "protocol.topics" and manifest.__name__ == "protocol.manifest"
    assert set(protocol.__all__) <= set(dir(protocol))
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        protocol.nothing_here  # noqa: B018
