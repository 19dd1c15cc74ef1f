"""A camera-like RGB model the project has never seen, from the command line, on a real Mosquitto.

The user's MobileNetV2 (alpha 0.35, 96x96x3, trained on [-1, 1] input) and their folder of JPEG files
(class folders): `edgesplit convert --data --preprocess` at two cuts (run once per machine by the
fixture, as the model's training is), `edgesplit profile --data`,
`edgesplit cloud` and `edgesplit device run` (a process that cannot import TensorFlow) reading the
JPEG files; end-to-end accuracy within 1 % of the Keras model's on the same images.  Then
`edgesplit audit BUNDLE` finds the model and the images the bundle was made from and writes the report,
with the reconstructions in colour (`audit my.keras --data D` is the same audit with one conversion
more; tests/integration/test_user_data.py runs it on a small model).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_core import require
from fixtures_models import BLOCKED_CLI, blocked_env
from fixtures_userdata import RGB_CUTS as CUTS

pytestmark = [pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def keras_model(user_rgb):
    require("tensorflow")
    import keras

    return keras.saving.load_model(user_rgb.model, compile=False)


@pytest.fixture(scope="module")
def converted(user_rgb):
    """The bundles `edgesplit convert mobilenet.keras --data shapes --preprocess ... --cut C` made (cached)."""
    return Path(next(iter(user_rgb.bundles.values()))).parent, user_rgb.printed


def test_rgb_mobilenet_converts_at_two_cuts_with_the_users_data(user_rgb, converted, keras_model):
    from protocol.manifest import load_bundle

    out, printed = converted
    assert user_rgb.accuracy >= 0.7, "the fixture's MobileNetV2 did not learn the shapes"
    for cut in CUTS:
        m = load_bundle(out / f"{cut}.tar.gz").manifest
        pre = m.input.preprocess
        assert (m.cut, m.input.shape, pre.color_mode, pre.mean, pre.std) == (cut, (96, 96, 3), "RGB", 127.5, 127.5)
        assert tuple(pre.value_range) == (-1.0, 1.0)
        assert m.labels == ["circle", "cross", "square", "triangle"] and m.output.kind == "probabilities"
        assert (m.dataset.kind, m.dataset.n_train, m.dataset.n_test, m.dataset.test_split) == ("folders", 480, 120,
                                                                                                 0.2)
        assert m.parity.n == 120 and m.parity.keras_accuracy == pytest.approx(user_rgb.accuracy, abs=1e-6)
        assert m.parity.agreement >= 0.97, printed[cut]
        assert "scaling from --preprocess" in printed[cut] and "480 train / 120 test" in printed[cut]


def test_device_reads_the_jpeg_files_as_parity_did(user_rgb, converted):
    """The device's decoding of the user's JPEG (and a PNG copy) equals the converter's, bit for bit."""
    from PIL import Image

    from converter.userdata import load_data
    from protocol.manifest import load_bundle
    from runtime.preprocess import Preprocessor

    out, _ = converted
    m = load_bundle(out / CUTS[0]).manifest
    data = load_data(user_rgb.images)
    files = data.test.items[:40]
    converter_x = data.for_input(m.input, progress=False).x_test[:40]
    device = Preprocessor(m.input)
    np.testing.assert_array_equal(device.batch(files), converter_x)
    pngs = []
    for f in files[:8]:
        png = out / f"{f.parent.name}-{f.stem}.png"
        Image.open(f).save(png)
        pngs.append(png)
    np.testing.assert_array_equal(device.batch(pngs), converter_x[:8])


def test_end_to_end_on_mosquitto_matches_keras_within_one_percent(user_rgb, converted, keras_model, mosquitto_broker,
                                                                 cloud_command, tmp_path, capsys):
    from converter.userdata import load_data
    from protocol.manifest import load_bundle
    from runtime.preprocess import Preprocessor

    out, _ = converted
    data = load_data(user_rgb.images)
    files, truth = [str(f) for f in data.test.items], data.test.y
    bundles = [out / cut for cut in CUTS]
    x = Preprocessor(load_bundle(bundles[0]).manifest.input).batch(files)
    keras_acc = float(np.mean(keras_model.predict(x, verbose=0).argmax(-1) == truth))

    # the device's view of the costs: `edgesplit profile --data` times each head on the user's images
    prof = subprocess.run([sys.executable, "-c", BLOCKED_CLI, "profile", "--bundle", *map(str, bundles), "--data",
                           str(user_rgb.images), "--runs", "30", "--out", str(tmp_path / "profile.json"), "--json"],
                          env=blocked_env(tmp_path), cwd=tmp_path, text=True, capture_output=True, timeout=900)
    assert prof.returncode == 0, prof.stderr
    profile = json.loads((tmp_path / "profile.json").read_text())

    lines = []
    for b in bundles:
        cloud = cloud_command(mosquitto_broker.url, b, json=False)
        cloud.wait_ready()
        dev = subprocess.run([sys.executable, "-c", BLOCKED_CLI, "device", "run", "--bundle", str(b), "--broker",
                              mosquitto_broker.url, "--device-id", "pi-rgb", "--timeout", "120", *files],
                             env=blocked_env(tmp_path), cwd=tmp_path, text=True, capture_output=True, timeout=1200)
        cloud.stop()
        assert dev.returncode == 0, dev.stderr
        rows = {r["input"]: r for r in map(json.loads, dev.stdout.splitlines())}
        assert len(rows) == len(files)
        e2e_acc = float(np.mean([rows[f]["index"] == t for f, t in zip(files, truth)]))
        manifest = load_bundle(b).manifest
        assert abs(e2e_acc - keras_acc) <= 0.01, (b.name, e2e_acc, keras_acc)
        assert all(0.0 < rows[f]["probability"] <= 1.0 for f in files)
        cut = next(c for c in profile["cuts"] if c["cut"] == manifest.cut)
        wire = cut["frame_bytes_wire"]
        assert wire is not None and cut["feature_bytes"] == manifest.feature.nbytes   # measured on the JPEGs
        lines.append(f"{manifest.cut:<22} parity {manifest.parity.agreement:.4f}  end-to-end {e2e_acc:.4f}  "
                     f"(Keras {keras_acc:.4f})  head {cut['head_ms']['median']:.2f} ms median  "
                     f"{manifest.feature.nbytes} B int8, {wire:.0f} B per frame as sent")
    with capsys.disabled():
        print("\nuser RGB MobileNetV2 (alpha 0.35, 96x96), 120 JPEG test images:\n  " + "\n  ".join(lines))


def test_audit_of_the_rgb_bundle_writes_colour_reconstructions(user_rgb, converted, tmp_path):
    from PIL import Image

    from edgesplit.cli import main

    bundles, _ = converted
    out = tmp_path / "audit"
    # no --model, no --data: the manifest names mobilenet.keras (and its sha256) and the image folder
    code = main(["audit", str(bundles / CUTS[0]), "--n", "40", "--attack-n", "4", "--iters", "40",
                 "--decoder-epochs", "1", "--out", str(out)])
    assert code == 0
    for name in ("report.html", "report.json", "report.md"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["classes"] == ["circle", "cross", "square", "triangle"]
    assert report["data"]["n_test"] == 120 and report["data"]["test_split"] == 0.2
    assert "(pixel - 127.5) / 127.5" in report["data"]["preprocess"]
    assert [c["name"] for c in report["cuts"]] == [CUTS[0]]
    assert "classes circle, cross, square, triangle" in (out / "report.md").read_text()
    # the reconstruction grid is in colour: many of its pixels are far from grey
    grid = np.asarray(Image.open(out / "figures" / "grid.png").convert("RGB"), np.int16)
    spread = np.abs(grid[..., 0] - grid[..., 1]) + np.abs(grid[..., 1] - grid[..., 2])
    assert (spread > 60).mean() > 0.01
