"""The paper's model end to end: 1,000 MNIST test images as PNG files, a device process that cannot
import TensorFlow, a cloud process, a real Mosquitto; every answer equals the split model's own."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.preprocess import Preprocessor
from device.runtime import Model
from protocol.manifest import load_bundle

ROOT = Path(__file__).resolve().parents[2]
N = 1000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def paper_bundle(paper_model, tmp_path_factory):
    from converter import bundle

    out = tmp_path_factory.mktemp("paper") / "bundle"
    return bundle.convert(paper_model, cut="pool2", quant="int8", calibration=500, out=out, parity_n=2000,
                          progress=False)


def test_paper_cnn_device_process_without_tensorflow(mosquitto_broker, paper_bundle, mnist, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_device_agent import _env, DEVICE_MAIN

    folder = tmp_path / "mnist"
    folder.mkdir()
    for i in range(N):
        k = np.round(np.asarray(mnist.x_test[i, ..., 0]) * 255).astype(np.uint8)
        Image.fromarray(k, "L").save(folder / f"{i:04d}.png")
    b = load_bundle(paper_bundle.bundle_dir)
    paths = sorted(folder.glob("*.png"))
    x = Preprocessor(b.manifest.input).batch(paths)
    np.testing.assert_array_equal(x, np.asarray(mnist.x_test[:N]))   # the PNGs are the dataset
    local = Model(b.tail_path).run_float(b.feature.dequantize(Model(b.head_path).run(x))).argmax(axis=1)

    log = open(tmp_path / "cloud.log", "w")
    cloud = subprocess.Popen([sys.executable, "-m", "edgesplit", "cloud", "--bundle", str(b.root), "--broker",
                              mosquitto_broker.url, "--stats-every", "0"], stdout=log, stderr=subprocess.STDOUT,
                             cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while "ready" not in (tmp_path / "cloud.log").read_text():
            assert cloud.poll() is None and time.monotonic() < deadline, (tmp_path / "cloud.log").read_text()
            time.sleep(0.1)
        dev = subprocess.Popen([sys.executable, "-c", DEVICE_MAIN, "device", "run", "--bundle", str(b.root),
                                "--broker", mosquitto_broker.url, "--device-id", "pi-paper", "--timeout", "120",
                                str(folder)], env=_env(tmp_path), cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = dev.communicate(timeout=1200)
        assert dev.returncode == 0, err
    finally:
        cloud.send_signal(signal.SIGTERM)
        cloud.wait(60)
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == N and len({r["request_id"] for r in rows}) == N
    got = {r["input"]: int(r["label"]) for r in rows}
    assert got == {str(p): int(l) for p, l in zip(paths, local)}
    accuracy = float(np.mean([got[str(p)] == int(mnist.y_test[i]) for i, p in enumerate(paths)]))
    assert accuracy >= 0.98
    report = json.loads((tmp_path / "block-report.json").read_text())
    assert report == {"attempts": [], "interpreter": ["ai_edge_litert"]}
    print(f"paper-cnn pool2 int8: {N} images, accuracy {accuracy:.4f}; device: {err.strip().splitlines()[-3:]}")
