"""``edgesplit profile`` on a real tiny bundle with the real LiteRT interpreter, and the planner reading it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgesplit.cli import main


@pytest.fixture
def images(tmp_path, synthetic):
    x, _ = synthetic
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.round(x[i, :, :, 0] * 255).astype(np.uint8), "L").save(folder / f"{i}.png")
    return folder


def test_profile_writes_head_and_tail_times_and_frame_bytes(tiny_bundle, images, tmp_path, capsys):
    out = tmp_path / "device.json"
    assert main(["profile", "--bundle", str(tiny_bundle.root), "--out", str(out), "--runs", "20",
                 "--inputs", str(images)]) == 0
    printed = capsys.readouterr().out
    assert "pool1" in printed and str(out) in printed
    d = json.loads(out.read_text())
    assert d["schema"] == "edgesplit.profile/1"
    assert d["threads"] == 1 and d["runs"] == 20 and d["interpreter"]["name"]
    assert d["machine"]["cores"] >= 1
    (cut,) = d["cuts"]
    assert cut["cut"] == tiny_bundle.manifest.cut and cut["bundle_id"] == tiny_bundle.bundle_id
    assert cut["head_ms"]["n"] == 20 and 0 < cut["head_ms"]["median"] <= cut["head_ms"]["max"]
    assert cut["tail_ms"]["median"] > 0
    # the frame is the header plus the raw int8 tensor; real images were encoded as the agent sends them
    assert cut["feature_bytes"] == tiny_bundle.feature.nbytes
    assert cut["frame_bytes_raw"] == cut["frame_header_bytes"] + cut["feature_bytes"]
    assert cut["frame_header_bytes"] <= 64
    assert 0 < cut["frame_bytes_wire"] <= cut["frame_bytes_raw"]
    assert "8 images" in d["inputs"]
    assert d["input"]["bytes"] == 28 * 28 and d["full_ms"] == pytest.approx(
        cut["head_ms"]["median"] + cut["tail_ms"]["median"])


def test_the_planner_uses_the_device_profile(tiny_bundle, tmp_path, capsys):
    prof = tmp_path / "pi.json"
    assert main(["profile", "--bundle", str(tiny_bundle.root), "--out", str(prof), "--runs", "5",
                 "--part", "head"]) == 0
    capsys.readouterr()
    d = json.loads(prof.read_text())
    assert d["cuts"][0]["tail_ms"] is None and d["cuts"][0]["frame_bytes_wire"] is None
    m = tiny_bundle.manifest
    report = {"schema": "edgesplit.audit/1", "model": m.model, "input": {"bytes": 784},
              "cuts": [{"name": m.cut, "cost": {"bytes_int8": tiny_bundle.feature.nbytes, "frame_bytes": 300.0,
                                                "head_ms": 99.0, "tail_ms": 0.1},
                        "leakage_db": 20.0, "dcor": {"int8": 0.8}}]}
    rpath = tmp_path / "report.json"
    rpath.write_text(json.dumps(report))
    assert main(["plan", str(rpath), "--uplink", "1mbit", "--rtt", "40ms", "--device-profile", str(prof),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    opt = next(o for o in plan["options"] if o["name"] == m.cut)
    assert opt["sources"]["device_ms"] == "device profile"
    assert opt["device_ms"] == pytest.approx(d["cuts"][0]["head_ms"]["median"])
    assert opt["device_ms"] < 99.0


def test_profile_runs_where_tensorflow_does_not_exist(tiny_bundle, tmp_path):
    from fixtures_models import run_blocked

    out = tmp_path / "p.json"
    proc = run_blocked(tmp_path, """
        import sys
        from edgesplit.cli import main
        code = main(sys.argv[1:])
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        raise SystemExit(code)
    """, args=("profile", "--bundle", str(tiny_bundle.root), "--out", str(out), "--runs", "3"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["cuts"][0]["head_ms"]["n"] == 3


def test_a_missing_bundle_is_a_clear_error(tmp_path, capsys):
    assert main(["profile", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json")]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "fix:" in err
