"""Model and data fixtures shared by the whole suite (owned by the converter foundation).

Session-scoped: each model is built or loaded once per test run.  Trained zoo
models come from the edgesplit cache ($EDGESPLIT_CACHE or ~/.cache/edgesplit);
``paper_model`` trains paper-cnn if it is not cached (tens of minutes on a busy
CPU), so tests that use it should be marked ``slow``.

``tiny_models`` / ``tiny_bundle`` / ``tiny_bundle_dir``: the suite's small real
artefacts (three .tflite files and a converted bundle), built once per machine by
:func:`cached_build` under ``$EDGESPLIT_CACHE/test/`` — in a subprocess, so the
test process needs no TensorFlow when they are cached.  Tests and helpers that
need them outside a fixture call :func:`tiny_models`.

Also here: :func:`blocked_env` and :func:`run_blocked` (a Python where importing TensorFlow
raises, as on a Pi), ``paper_pool2_cli`` (the paper model's pool2 bundle, converted once per run),
``one_wheel_build`` (device packages reuse one wheel per run) and :func:`unit_keys`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
_DONE = ".complete"

# Run as ``python -c TINY_RECIPE OUT``.  Any edit to it (or a new bundle schema) is a new cache entry.
TINY_RECIPE = """
import os, sys
from pathlib import Path
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np
import tensorflow as tf
from converter import bundle, datasets

out = Path(sys.argv[1])
L = keras.layers
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)

# (N, 8, 8, 1) float32 -> (N, 3): float.tflite, and int8.tflite with int8 input and output
inp = keras.Input((8, 8, 1))
small = keras.Model(inp, L.Dense(3)(L.Flatten()(L.Conv2D(2, 3, padding="same", activation="relu")(inp))))
(out / "float.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(small).convert())
calib = rng.random((32, 8, 8, 1), dtype=np.float32)
conv = tf.lite.TFLiteConverter.from_keras_model(small)
conv.optimizations = [tf.lite.Optimize.DEFAULT]
conv.representative_dataset = lambda: ([c[None]] for c in calib)
conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
conv.inference_input_type = tf.int8
conv.inference_output_type = tf.int8
(out / "int8.tflite").write_bytes(conv.convert())

# pinned.tflite: a graph that reshapes to a hard-coded batch of 1
w = tf.constant(rng.standard_normal((64, 3)).astype(np.float32))

@tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32)])
def pinned(x):
    return tf.matmul(tf.reshape(x, [1, 64]), w)

conv = tf.lite.TFLiteConverter.from_concrete_functions([pinned.get_concrete_function()], pinned)
(out / "pinned.tflite").write_bytes(conv.convert())

# bundle/: an MNIST-shaped tiny CNN trained on synthetic shapes, cut at pool1 (14x14x4 int8 features)
x, y = datasets.synthetic_images(300, seed=0)
inp = keras.Input((28, 28, 1), name="image")
h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
h = L.MaxPooling2D(2, name="pool1")(h)
h = L.Dense(10, activation="softmax", name="dense")(L.Flatten(name="flatten")(h))
model = keras.Model(inp, h, name="tiny_device_test")
model.compile("adam", "sparse_categorical_crossentropy")
model.fit(x[:200], y[:200], epochs=2, verbose=0)
bundle.convert(model, cut="pool1", quant="int8", calibration=100, out=out / "bundle", parity_n=100,
               data=datasets.Mnist(x[:200], y[:200], x[200:], y[200:]), progress=False)
"""


def cached_build(name: str, recipe: str, check=None) -> Path:
    """``$EDGESPLIT_CACHE/test/<name>-<hash>``: built once per machine by ``python -c recipe DIR``.

    The key hashes the recipe and the bundle schema version.  A file lock keeps
    parallel runs from building it twice; ``check(dir)`` (e.g. load_bundle) that
    raises on a cached entry makes it build again.
    """
    from converter.datasets import cache_dir, file_lock
    from protocol.manifest import SCHEMA_VERSION

    key = hashlib.sha256(f"schema {SCHEMA_VERSION}\n{recipe}".encode()).hexdigest()[:12]
    base = cache_dir() / "test"
    base.mkdir(exist_ok=True)
    out = base / f"{name}-{key}"
    with file_lock(base / f"{name}.lock", f"building {name}"):
        if (out / _DONE).is_file():
            try:
                if check is not None:
                    check(out)
                return out
            except Exception as exc:  # damaged or made by an older reader: build it again
                print(f"rebuilding {out}: {exc}", file=sys.stderr)
        tmp = base / f".{name}-{key}.{os.getpid()}.tmp"
        for stale in (tmp, out):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run([sys.executable, "-c", recipe, str(tmp)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"building the test artefact {name} failed:\n{done.stderr[-4000:]}")
        (tmp / _DONE).write_text("ok\n")
        os.replace(tmp, out)
    return out


def tiny_models() -> Path:
    """The folder of the tiny artefacts (see TINY_RECIPE):

    * ``float.tflite``  — (N, 8, 8, 1) float32 -> (N, 3) float32, batch resizable;
    * ``int8.tflite``   — the same with int8 input and output;
    * ``pinned.tflite`` — a graph that reshapes to a hard-coded batch of 1;
    * ``bundle/``       — a tiny CNN (trained on synthetic shapes) cut at pool1, int8, written by
      ``converter.bundle.convert``.
    """
    from protocol.manifest import load_bundle

    return cached_build("tiny-models", TINY_RECIPE, check=lambda d: load_bundle(d / "bundle"))


# ---------------------------------------------------------------- interpreters without TensorFlow

# ``import _block_tf`` first: importing any of $BLOCK_MODULES (default tensorflow, keras) then raises
# ImportError and is recorded in ATTEMPTS, so an import hidden behind try/except is caught too.  With
# $BLOCK_REPORT set, the attempts and the TFLite interpreter modules loaded are written there at exit.
BLOCKER = """
import atexit, importlib.abc, json, os, sys

BLOCKED = tuple(n for n in os.environ.get("BLOCK_MODULES", "tensorflow,keras").split(",") if n)
ATTEMPTS = []


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ImportError(f"{name} is not available on this device (blocked by the test)")
        return None


sys.meta_path.insert(0, _Block())

if os.environ.get("BLOCK_REPORT"):
    @atexit.register
    def _report():
        with open(os.environ["BLOCK_REPORT"], "w") as f:
            json.dump({"attempts": ATTEMPTS,
                       "interpreter": [m for m in ("ai_edge_litert", "tflite_runtime") if m in sys.modules]}, f)
"""


# ``python -c BLOCKED_CLI <verb> ...``: the edgesplit command in such an interpreter (a device's view).
BLOCKED_CLI = "import _block_tf, sys\nfrom edgesplit.cli import main\nsys.exit(main(sys.argv[1:]))"


def blocked_env(folder: Path, block: str = "tensorflow,keras", **extra) -> dict:
    """Environment for a Python whose programs start with ``import _block_tf`` (written into ``folder``)."""
    (folder / "_block_tf.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)])
    env["BLOCK_MODULES"] = block
    env.pop("EDGESPLIT_INTERPRETER", None)
    env.update(extra)
    return env


def run_blocked(folder: Path, code: str, *, block: str = "tensorflow,keras", env_extra=None, args=()):
    """Run ``code`` (dedented) in a fresh Python where importing any of ``block`` raises (see :data:`BLOCKER`)."""
    env = blocked_env(folder, block, **(env_extra or {}))
    prog = "import _block_tf\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog, *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="session")
def mnist():
    """MNIST: converter.datasets.Mnist (60k train, 10k test, float32 (N,28,28,1) in [0,1])."""
    from fixtures_core import require

    return require("mnist")


@pytest.fixture(scope="session")
def synthetic():
    """(x, y): 500 synthetic 28x28x1 shape images in 10 classes, seed 7 (not the zoo's training seed)."""
    from converter.datasets import synthetic_images

    return synthetic_images(500, seed=7)


@pytest.fixture(scope="session")
def paper_model():
    """The trained paper-cnn (Tuor et al.) from the cache, trained if needed."""
    from converter import zoo

    return zoo.load_model("paper-cnn")


@pytest.fixture(scope="session")
def paper_pool2_cli(tmp_path_factory):
    """``edgesplit convert paper-cnn --cut pool2 --quant int8 --out DIR``, run once per session (in this
    process): ``.code``, ``.printed`` (its stdout) and ``.out`` (the bundle directory, .tar.gz beside it)."""
    import contextlib
    import io
    import types

    from edgesplit.cli import main

    out = tmp_path_factory.mktemp("paper-pool2") / "pool2"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["convert", "paper-cnn", "--cut", "pool2", "--quant", "int8", "--out", str(out)])
    return types.SimpleNamespace(code=code, printed=printed.getvalue(), out=out)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny-cnn trained on synthetic shapes (seconds to train; cached)."""
    from converter import zoo

    return zoo.load_model("tiny-cnn")


@pytest.fixture(scope="session")
def residual_model():
    """residual-cnn: a trained functional model with a residual block and a two-branch block."""
    from converter import zoo

    return zoo.load_model("residual-cnn")


@pytest.fixture(scope="session")
def branching_model():
    """An untrained model that forks right at the input (inception-like) and has a depthwise conv."""
    from converter import zoo

    return zoo.build_branching_cnn()


@pytest.fixture(scope="session", name="tiny_models")
def tiny_models_fixture() -> Path:
    """Folder with float.tflite, int8.tflite, pinned.tflite and bundle/ (see :func:`tiny_models`)."""
    return tiny_models()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_models):
    """The tiny bundle, loaded and verified: a ``protocol.manifest.Bundle`` (``.root`` is its directory)."""
    from protocol.manifest import load_bundle

    return load_bundle(tiny_models / "bundle")


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_bundle) -> Path:
    """The tiny bundle's directory, for tests that hand a path to a command or a config."""
    return tiny_bundle.root


# ---------------------------------------------------------------- device packages

def unit_keys(text: str) -> dict[str, list[str]]:
    """A systemd unit as {"Section.Key": [values]} (keys may repeat, e.g. LoadCredential=)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        keys.setdefault(f"{section}.{k.strip()}", []).append(v.strip())
    return keys


@pytest.fixture(scope="session")
def checkout_wheel(tmp_path_factory) -> Path:
    """edgesplit's wheel, built from this checkout by the real ``deploy.device_package.build_wheel`` (pip)."""
    from deploy.device_package import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def one_wheel_build(checkout_wheel, monkeypatch):
    """``build_device_package`` in this process ships :func:`checkout_wheel` instead of building the same
    wheel again: the sources do not change during a run, and each pip build takes seconds.  (Packages
    built by ``edgesplit bundle device`` in a subprocess still build their own.)"""
    from deploy import device_package

    def copy_wheel(out_dir, source=None):
        assert source is None, "one_wheel_build only stands in for builds of this checkout"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(checkout_wheel, out_dir))

    monkeypatch.setattr(device_package, "build_wheel", copy_wheel)
