"""One runtime: the device, the auditor and the parity check see the very same tensors.

The same images go (1) through ``edgesplit device run`` in its own process without
TensorFlow, whose frames are captured on a real Mosquitto, (2) through the auditor's
``sent_features`` and (3) through converter parity's head; the int8 tensors must be
byte-identical, so the auditor attacks exactly what a device sends and parity checks
exactly what a device runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol import topics
from protocol.frame import decode_frame

from fixtures_models import BLOCKED_CLI, blocked_env

pytestmark = pytest.mark.timeout(300)

N = 40
FLEET, DEVICE = "lab", "pi-same"


@pytest.fixture(scope="module")
def pixels():
    """MNIST-like uint8 images, as a camera or a user would save them."""
    from converter import datasets

    x, _ = datasets.synthetic_images(N, seed=23)
    return np.round(x[..., 0] * 255).astype(np.uint8)


def device_tensors(tiny_bundle, pixels, broker, start_worker, collect, tmp_path) -> np.ndarray:
    """What ``edgesplit device run`` publishes for the PNGs of ``pixels``, in image order."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(pixels):
        Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    sent = collect(broker.url, topics.features(FLEET, DEVICE))
    start_worker(broker.url, tiny_bundle)       # answers, so the device finishes without resending
    proc = subprocess.run([sys.executable, "-c", BLOCKED_CLI, "device", "run", "--bundle", str(tiny_bundle.root),
                           "--broker", broker.url, "--device-id", DEVICE, "--fleet", FLEET, "--timeout", "120",
                           str(folder)], env=blocked_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) == N and all("error" not in r for r in rows), rows
    index = {r["request_id"]: int(Path(r["input"]).stem) for r in rows}   # request id -> image number
    assert sent.wait(N, timeout=30)
    frames = [decode_frame(p) for _, p in sent.got[topics.features(FLEET, DEVICE)]]
    assert sorted(index[f.request_id] for f in frames) == list(range(N))   # one frame each, none re-sent
    out = np.empty((N, *tiny_bundle.feature.shape), np.dtype(tiny_bundle.feature.dtype))
    for f in frames:
        assert f.bundle_id == tiny_bundle.bundle_id
        assert (f.scale, f.zero_point) == (tiny_bundle.feature.scale, tiny_bundle.feature.zero_point)
        out[index[f.request_id]] = f.tensor.reshape(tiny_bundle.feature.shape)
    return out


def test_device_auditor_and_parity_send_byte_identical_tensors(tiny_bundle, pixels, mosquitto_broker, start_worker,
                                                                collect, tmp_path):
    from auditor.features import sent_features
    from converter.parity import SplitRunner

    on_the_wire = device_tensors(tiny_bundle, pixels, mosquitto_broker, start_worker, collect, tmp_path)
    x = tiny_bundle.manifest.input.pixels_to_input(pixels)     # the same images, as the head takes them
    audited = sent_features(tiny_bundle, x).raw
    checked = SplitRunner(tiny_bundle).head(x)

    assert on_the_wire.dtype == audited.dtype == checked.dtype == np.int8
    assert on_the_wire.shape == audited.shape == checked.shape == (N, *tiny_bundle.feature.shape)
    assert on_the_wire.tobytes() == audited.tobytes()
    assert on_the_wire.tobytes() == checked.tobytes()
    # not vacuous: the images give different tensors, and not one value everywhere
    assert len({t.tobytes() for t in on_the_wire}) == N
    assert len(np.unique(on_the_wire)) > 10
