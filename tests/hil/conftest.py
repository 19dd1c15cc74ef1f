"""Fixtures of the hardware-in-the-loop suite (marker ``hil``); see docs/hil.md.

* the target: ``EDGESPLIT_HIL_TARGET`` = ``local`` (default: the Pi-like target in a
  network namespace on this machine) or ``ssh://user@host[:port]?dir=D&identity=KEY``;
* ``hil_bundle``: the paper's CNN cut at pool2 (int8) once ``paper-cnn`` is in the
  cache, else the device tests' tiny CNN; ``EDGESPLIT_HIL_BUNDLE=DIR`` forces one;
* ``hil_images``: MNIST test images as PNG files with their labels and the labels the
  split model gives them here (head + tail on this machine);
* ``hil_broker``: a real Mosquitto on 127.0.0.1 (the device reaches it through the relay);
* ``hil_report``: figures collected by the tests, printed at the end of the run and
  written to ``$EDGESPLIT_HIL_REPORT`` (JSON) when set.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))            # tests/ (for hil.targets)

from hil.targets import cache_root  # noqa: E402

N_IMAGES = 500
_REPORT = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_REPORT] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = config.stash.get(_REPORT, {})
    if not report:
        return
    terminalreporter.section("HIL figures")
    for name, figures in report.items():
        terminalreporter.write_line(f"{name}:")
        for k, v in figures.items():
            terminalreporter.write_line(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    path = os.environ.get("EDGESPLIT_HIL_REPORT")
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        terminalreporter.write_line(f"(written to {path})")


@pytest.fixture(scope="session")
def hil_report(request) -> dict:
    """name -> figures; shown in the 'HIL figures' section at the end of the run."""
    return request.config.stash[_REPORT]


# --------------------------------------------------------------------------- the model and the data

@dataclasses.dataclass(frozen=True)
class HilBundle:
    path: Path
    description: str


def _converted_as(bundle_dir: Path, model: str) -> bool:
    try:
        return json.loads((bundle_dir / "manifest.json").read_text()).get("model") == model
    except (OSError, ValueError):
        return False


def _paper_bundle() -> HilBundle | None:
    """The paper CNN at pool2 (int8), converted once per trained model and cached; None if not trained yet."""
    models = cache_root() / "models"
    keras_file, record = models / "paper-cnn.keras", models / "paper-cnn.json"
    if not (keras_file.is_file() and record.is_file()):
        return None
    key = hashlib.sha256(keras_file.read_bytes()).hexdigest()[:12]
    out = cache_root() / "hil" / f"paper-cnn-pool2-int8-{key}"
    desc = "paper-cnn (Tuor et al.) cut pool2, int8"
    if _converted_as(out, "paper-cnn"):
        return HilBundle(out, desc)         # converted before from this very model file
    from converter import zoo               # TensorFlow: only when a conversion is due

    entry = zoo.get_entry("paper-cnn")
    try:
        if json.loads(record.read_text()).get("recipe") != entry.recipe(entry.epochs):
            return None                     # load_model would retrain it: not in a test run
    except (OSError, ValueError):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted_as(out, "paper-cnn"):
            from converter import bundle

            tmp = out.parent / f".{out.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # named as `edgesplit convert paper-cnn` names it, so `edgesplit plan paper-cnn` takes its profile
            bundle.convert(zoo.load_model("paper-cnn"), cut="pool2", quant="int8", calibration=500, out=tmp,
                           parity_n=1000, progress=False, name="paper-cnn")
            shutil.rmtree(out, ignore_errors=True)          # one converted before under the Keras name
            os.replace(tmp, out)
    return HilBundle(out, desc)


@pytest.fixture(scope="session")
def hil_bundle() -> HilBundle:
    forced = os.environ.get("EDGESPLIT_HIL_BUNDLE")
    if forced:
        return HilBundle(Path(forced), f"{forced} (EDGESPLIT_HIL_BUNDLE)")
    paper = _paper_bundle()
    if paper is not None:
        return paper
    from fixtures_models import tiny_models

    return HilBundle(tiny_models() / "bundle",
                     "tiny test CNN (trained on synthetic shapes) cut pool1, int8 — paper-cnn is not in the cache yet")


@dataclasses.dataclass(frozen=True)
class HilImages:
    paths: list[Path]
    y_true: np.ndarray           # MNIST labels
    y_local: np.ndarray          # head + tail run here, on the same PNGs

    def accuracy(self, labels) -> float:
        return float(np.mean(np.asarray(labels) == self.y_true))


@pytest.fixture(scope="session")
def hil_images(hil_bundle, tmp_path_factory) -> HilImages:
    """The first 500 MNIST test images as PNGs (uint8 pixels, as a camera or a user would save them)."""
    from PIL import Image

    from converter.datasets import load_mnist
    from protocol.manifest import load_bundle
    from runtime.interpreter import Model
    from runtime.preprocess import Preprocessor

    mnist = load_mnist()
    folder = tmp_path_factory.mktemp("hil-mnist")
    paths = []
    for i in range(N_IMAGES):
        k = np.round(np.asarray(mnist.x_test[i, ..., 0]) * 255).astype(np.uint8)
        p = folder / f"{i:05d}.png"
        Image.fromarray(k, "L").save(p)
        paths.append(p)
    b = load_bundle(hil_bundle.path)
    x = Preprocessor(b.manifest.input).batch(paths)
    local = Model(b.tail_path).run_float(b.feature.dequantize(Model(b.head_path).run(x))).argmax(axis=1)
    return HilImages(paths, np.asarray(mnist.y_test[:N_IMAGES]), np.asarray(local))


@pytest.fixture(scope="session")
def hil_broker(tmp_path_factory):
    """A real Mosquitto on 127.0.0.1 for the whole HIL session (devices reach it through a relay)."""
    from deploy.broker import start_mosquitto
    from fixtures_core import require

    require("mosquitto")
    b = start_mosquitto("127.0.0.1", workdir=tmp_path_factory.mktemp("hil-mosquitto"))
    yield b
    b.cleanup()
