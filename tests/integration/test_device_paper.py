"""The paper's model end to end: 1,000 MNIST test images as PNG files, a device process that cannot
import TensorFlow, a cloud process, a real Mosquitto; every answer equals the split model's own."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.manifest import load_bundle
from runtime.interpreter import Model
from runtime.preprocess import Preprocessor

from fixtures_models import BLOCKED_CLI, blocked_env

ROOT = Path(__file__).resolve().parents[2]
N = 1000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_paper_cnn_device_process_without_tensorflow(mosquitto_broker, paper_pool2_cli, mnist, cloud_command,
                                                    tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for i in range(N):
        k = np.round(np.asarray(mnist.x_test[i, ..., 0]) * 255).astype(np.uint8)
        Image.fromarray(k, "L").save(folder / f"{i:04d}.png")
    b = load_bundle(paper_pool2_cli.out)         # `edgesplit convert paper-cnn --cut pool2 --quant int8`
    paths = sorted(folder.glob("*.png"))
    x = Preprocessor(b.manifest.input).batch(paths)
    np.testing.assert_array_equal(x, np.asarray(mnist.x_test[:N]))   # the PNGs are the dataset
    local = Model(b.tail_path).run_float(b.feature.dequantize(Model(b.head_path).run(x))).argmax(axis=1)

    cloud = cloud_command(mosquitto_broker.url, b.root, json=False)
    cloud.wait_ready()
    dev = subprocess.run([sys.executable, "-c", BLOCKED_CLI, "device", "run", "--bundle", str(b.root),
                          "--broker", mosquitto_broker.url, "--device-id", "pi-paper", "--timeout", "120",
                          str(folder)], env=blocked_env(tmp_path, BLOCK_REPORT=str(tmp_path / "block-report.json")),
                         cwd=tmp_path, text=True, capture_output=True, timeout=1200)
    out, err = dev.stdout, dev.stderr
    assert dev.returncode == 0, err
    cloud.stop()
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == N and len({r["request_id"] for r in rows}) == N
    got = {r["input"]: int(r["label"]) for r in rows}
    assert got == {str(p): int(l) for p, l in zip(paths, local)}
    accuracy = float(np.mean([got[str(p)] == int(mnist.y_test[i]) for i, p in enumerate(paths)]))
    assert accuracy >= 0.98
    report = json.loads((tmp_path / "block-report.json").read_text())
    assert report == {"attempts": [], "interpreter": ["ai_edge_litert"]}
    print(f"paper-cnn pool2 int8: {N} images, accuracy {accuracy:.4f}; device: {err.strip().splitlines()[-3:]}")
