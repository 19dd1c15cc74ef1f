"""The roles that run on the Pi stay readable: no module of device/, protocol/ or runtime/ over 500 lines
(the design's rule is to split a file well before it nears 1,000 lines anywhere)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMITS = {"device": 500, "protocol": 500, "runtime": 500}
ANYWHERE = 1000
ROLES = ("protocol", "runtime", "device", "cloud", "converter", "auditor", "deploy", "edgesplit")


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_module_of_the_device_side_is_over_500_lines():
    big = {str(p.relative_to(ROOT)): n for role, limit in LIMITS.items()
           for p in sorted((ROOT / role).rglob("*.py")) if (n := _lines(p)) > limit}
    assert big == {}, f"split these modules (limit {LIMITS}): {big}"


def test_no_module_anywhere_nears_1000_lines():
    big = {str(p.relative_to(ROOT)): n for role in ROLES
           for p in sorted((ROOT / role).rglob("*.py")) if (n := _lines(p)) >= ANYWHERE}
    assert big == {}, f"split these modules before they reach {ANYWHERE} lines: {big}"
