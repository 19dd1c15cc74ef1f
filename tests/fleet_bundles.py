"""Small real bundles for the fleet tests, built once per machine (``fixtures_models.cached_build``).

* ``a/``   a tiny CNN (28x28x1 -> 10) cut at ``pool1``, int8: what the fleet starts with;
* ``b/``   the same model cut at ``conv1`` (another cut: another feature shape, another tail);
* ``bad/`` bundle ``a`` whose ``head.tflite`` is another model's head of the same shapes, so it
  loads, verifies and checks against its manifest, but fails its self-test;
* ``wide/`` a model for 16x16 inputs (another model input).

Each directory has its ``.tar.gz`` beside it, made by ``edgesplit convert``'s code.
"""
from __future__ import annotations

from pathlib import Path

from fixtures_models import cached_build

RECIPE = """
import os, shutil, sys
from pathlib import Path
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np
from converter import bundle, datasets
from protocol import manifest as mf

out = Path(sys.argv[1])
L = keras.layers


def model(seed, size=28):
    keras.utils.set_random_seed(seed)
    x, y = datasets.synthetic_images(300, seed=seed)
    if size != 28:
        x = x[:, :size, :size, :]
    inp = keras.Input((size, size, 1), name="image")
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.MaxPooling2D(2, name="pool1")(h)
    h = L.Dense(10, activation="softmax", name="dense")(L.Flatten(name="flatten")(h))
    m = keras.Model(inp, h, name="fleet_test")
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(x[:200], y[:200], epochs=2, verbose=0)
    return m, datasets.Mnist(x[:200], y[:200], x[200:], y[200:])


def conv(m, data, cut, name):
    bundle.convert(m, cut=cut, quant="int8", calibration=100, out=out / name, parity_n=100, data=data,
                   progress=False, min_agreement=0.0)


m, data = model(0)
conv(m, data, "pool1", "a")
conv(m, data, "conv1", "b")
other, data2 = model(1)
conv(other, data2, "pool1", "other")
# bad: another model's bundle carrying a's probe: it loads and verifies, its head fails the probe
shutil.copytree(out / "other", out / "bad")
shutil.copy2(out / "a" / "probe.npz", out / "bad" / "probe.npz")
draft = mf.read_manifest(out / "bad" / "manifest.json")
mf.write_bundle(out / "bad", draft)
mf.write_tarball(out / "bad")
wide, data3 = model(2, size=16)
conv(wide, data3, "pool1", "wide")
"""


def fleet_bundles() -> Path:
    """The folder holding ``a``, ``b``, ``bad``, ``wide`` (directories and ``.tar.gz``)."""
    from protocol.manifest import load_bundle

    def check(d: Path) -> None:
        for name in ("a", "b", "bad", "wide"):
            load_bundle(d / name)
            load_bundle(d / f"{name}.tar.gz")

    return cached_build("fleet-bundles", RECIPE, check=check)
