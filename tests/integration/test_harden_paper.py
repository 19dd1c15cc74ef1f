"""The hardened paper-cnn at pool2 end to end: MNIST test images as PNG files, a device process that
cannot import TensorFlow, a real Mosquitto, ``edgesplit cloud``.  The device draws the declared noise
for every input (the frames on the broker are never the clean tensor), the cloud answers exactly what
its tail makes of those frames, and the end-to-end accuracy is the parity check's, up to the noise's
own sampling error.  Small settings: the hardened model (100 steps of tail fine-tuning) is built once
per machine and cached."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from protocol import topics
from protocol.frame import decode_frame
from protocol.manifest import load_bundle
from runtime.preprocess import Preprocessor
from runtime.split import Head, Tail

from fixtures_models import BLOCKED_CLI, blocked_env, cached_build

N = 500
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# ``python -c RECIPE OUT``: paper-cnn hardened at pool2 with Gaussian noise of 1 x the features' RMS.
RECIPE = """
import sys
from pathlib import Path
from auditor.defences.finetune import FinetuneSettings, harden_model
from converter import bundle, datasets, zoo

out = Path(sys.argv[1])
d = datasets.load_mnist()
h = harden_model(zoo.load_model("paper-cnn"), "pool2", "noise", 1.0, d.x_train[:50000], d.y_train[:50000],
                 settings=FinetuneSettings(steps=100))
h.model.save(out / "model.keras")
bundle.convert(h.model, cut="pool2", out=out / "bundle", parity_n=%d, name="paper-cnn", progress=False)
""" % N


@pytest.fixture(scope="module")
def hardened_pool2():
    return cached_build("paper-pool2-noise", RECIPE, check=lambda d: load_bundle(d / "bundle"))


def test_hardened_bundle_through_device_mosquitto_and_cloud(hardened_pool2, mosquitto_broker, mnist, cloud_command,
                                                            collect, tmp_path):
    b = load_bundle(hardened_pool2 / "bundle")
    assert b.manifest.defence.op == "noise" and b.manifest.parity.passed
    folder = tmp_path / "mnist"
    folder.mkdir()
    for i in range(N):
        Image.fromarray(np.round(np.asarray(mnist.x_test[i, ..., 0]) * 255).astype(np.uint8), "L").save(
            folder / f"{i:04d}.png")
    paths = sorted(folder.glob("*.png"))
    frames = collect(mosquitto_broker.url, topics.all_features())
    cloud = cloud_command(mosquitto_broker.url, b.root, json=False)
    cloud.wait_ready()
    dev = subprocess.run([sys.executable, "-c", BLOCKED_CLI, "device", "run", "--bundle", str(b.root),
                          "--broker", mosquitto_broker.url, "--device-id", "pi-hardened", "--timeout", "120",
                          str(folder)], env=blocked_env(tmp_path), cwd=tmp_path, text=True, capture_output=True,
                         timeout=1200)
    assert dev.returncode == 0, dev.stderr
    cloud.stop()
    assert frames.wait(N, timeout=30)
    rows = [json.loads(line) for line in dev.stdout.splitlines() if line.strip()]
    assert len(rows) == N
    answers = {int(r["request_id"]): int(r["label"]) for r in rows}
    names = {int(r["request_id"]): r["input"] for r in rows}

    # What crossed the broker is the defended tensor: never the clean head output, spread as declared.
    sent = {}
    for _, payload in frames.got[topics.all_features()]:
        f = decode_frame(payload)
        sent[f.request_id] = f.tensor
    ids = sorted(sent)
    x = Preprocessor(b.manifest.input).batch([names[i] for i in ids])
    d = b.manifest.defence
    clean = Head(b).model.run(x).astype(np.float32).reshape((len(ids),) + tuple(b.feature.shape))
    clean = (clean - d.head_zero_point) * d.head_scale
    wire = b.feature.dequantize(np.stack([sent[i] for i in ids]))
    residual = wire - clean
    assert np.all(np.abs(residual).reshape(len(ids), -1).max(axis=1) > 0)      # no clean tensor was sent
    assert np.std(residual) == pytest.approx(float(np.sqrt(np.mean(np.square(d.scale)))), rel=0.1)

    # The cloud answered what its tail reads from exactly those frames...
    local = Tail(b).run(np.stack([sent[i] for i in ids])).argmax(axis=1)
    assert [answers[i] for i in ids] == local.tolist()
    # ...and the end-to-end accuracy is the parity check's, within the noise's sampling error.
    truth = {str(p): int(mnist.y_test[i]) for i, p in enumerate(paths)}
    accuracy = float(np.mean([answers[i] == truth[names[i]] for i in ids]))
    parity = b.manifest.parity.accuracy
    tolerance = 3 * math.sqrt(2 * parity * (1 - parity) / N) + 1 / N
    print(f"hardened pool2 (noise 1.0): end to end {accuracy:.4f}, parity {parity:.4f} (tolerance {tolerance:.4f})")
    assert abs(accuracy - parity) <= tolerance
