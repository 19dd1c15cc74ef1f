"""device.runtime: the interpreter shim and the Model wrapper, on real .tflite files."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from device.runtime import BACKENDS, Model, TensorInfo, dequantize, pick_backend, quantize
from protocol.errors import UsageError

ARTIFACTS_VERSION = "device-test-models-v1"


def _cache_root() -> Path:
    root = os.environ.get("EDGESPLIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgesplit")
    return Path(root) / "test" / ARTIFACTS_VERSION


def tiny_artifacts() -> Path:
    """Small real models for device tests, built once per machine (TensorFlow needed only to build).

    * ``float.tflite``  — (N, 8, 8, 1) float32 -> (N, 3) float32, batch resizable;
    * ``int8.tflite``   — the same with int8 input and output;
    * ``pinned.tflite`` — a graph that reshapes to a hard-coded batch of 1;
    * ``bundle/``       — an MNIST-shaped bundle (tiny CNN cut at pool1, int8), written by
      ``converter.bundle.convert`` on synthetic images.
    """
    root = _cache_root()
    if (root / "done").is_file():
        from protocol.errors import BundleError
        from protocol.manifest import load_bundle

        try:
            load_bundle(root / "bundle")
            return root
        except BundleError:  # made by an older converter: build again
            shutil.rmtree(root, ignore_errors=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from converter import bundle as bundles
    from converter import datasets

    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root.parent))
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = L.Conv2D(2, 3, padding="same", activation="relu")(inp)
    h = L.Flatten()(h)
    out = L.Dense(3)(h)
    small = keras.Model(inp, out)
    conv = tf.lite.TFLiteConverter.from_keras_model(small)
    (work / "float.tflite").write_bytes(conv.convert())

    rng = np.random.default_rng(0)
    calib = rng.random((32, 8, 8, 1), dtype=np.float32)
    conv = tf.lite.TFLiteConverter.from_keras_model(small)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([c[None]] for c in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (work / "int8.tflite").write_bytes(conv.convert())

    w = tf.constant(rng.standard_normal((64, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32)])
    def pinned(x):
        return tf.matmul(tf.reshape(x, [1, 64]), w)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([pinned.get_concrete_function()], pinned)
    (work / "pinned.tflite").write_bytes(conv.convert())

    x, y = datasets.synthetic_images(300, seed=0)
    inp = keras.Input((28, 28, 1), name="image")
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.MaxPooling2D(2, name="pool1")(h)
    h = L.Flatten(name="flatten")(h)
    out = L.Dense(10, activation="softmax", name="dense")(h)
    model = keras.Model(inp, out, name="tiny_device_test")
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:200], y[:200], epochs=2, verbose=0)
    data = datasets.Mnist(x[:200], y[:200], x[200:], y[200:])
    bundles.convert(model, cut="pool1", quant="int8", calibration=100, out=work / "bundle", parity_n=100,
                    data=data, progress=False)
    (work / "done").write_text("ok\n")
    try:
        os.replace(work, root)
    except OSError:  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
    return root


@pytest.fixture(scope="module")
def models() -> Path:
    return tiny_artifacts()


def test_picks_litert_first_and_says_so(caplog):
    b = pick_backend()
    assert b.name == BACKENDS[0][0] == "ai_edge_litert"
    assert b.version != "unknown"
    assert b.to_dict()["module"] == "ai_edge_litert.interpreter"


def test_unknown_interpreter_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown interpreter 'tflite'") as e:
        pick_backend("tflite")
    assert "ai_edge_litert" in e.value.fix


def test_model_describes_its_tensors(models):
    m = Model(models / "float.tflite", num_threads=1)
    assert m.backend.name == "ai_edge_litert"
    assert m.sample_shape == (8, 8, 1)
    assert m.input.dtype == np.float32 and not m.input.quantized
    assert m.output.shape[1:] == (3,)
    assert "float.tflite" in repr(m)
    q = Model(models / "int8.tflite")
    assert q.input.dtype == np.int8 and q.input.quantized and q.input.scale > 0
    assert q.output.quantized
    assert set(q.input.to_dict()) == {"name", "shape", "dtype", "scale", "zero_point"}


def test_batches_of_any_size_give_the_same_answers_as_one_at_a_time(models):
    m = Model(models / "float.tflite")
    x = np.random.default_rng(1).random((7, 8, 8, 1), dtype=np.float32)
    one_by_one = np.concatenate([m.run(x[i:i + 1]) for i in range(7)])
    for n in (7, 3, 1, 5):   # grow, shrink, back to one, grow again
        np.testing.assert_allclose(m.run(x[:n]), one_by_one[:n], rtol=1e-5, atol=1e-6)
    assert m.run(x[:0]).shape == (0, 3)


def test_float_input_to_an_int8_model_is_quantized_with_its_parameters(models):
    m = Model(models / "int8.tflite")
    x = np.random.default_rng(2).random((4, 8, 8, 1), dtype=np.float32)
    q = quantize(x, m.input.scale, m.input.zero_point, m.input.dtype)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(m.run(x), m.run(q))
    f = Model(models / "float.tflite").run(x)
    # the int8 model, dequantized, is close to the float one
    np.testing.assert_allclose(m.run_float(x), f, atol=20 * m.output.scale)
    assert m.run_float(x).dtype == np.float32


def test_a_graph_pinned_to_batch_one_still_runs_batches(models):
    m = Model(models / "pinned.tflite")
    x = np.random.default_rng(3).random((5, 8, 8, 1), dtype=np.float32)
    y = m.run(x)
    assert y.shape == (5, 3)
    np.testing.assert_allclose(y, np.concatenate([m.run(x[i:i + 1]) for i in range(5)]), rtol=1e-6)


def test_wrong_input_says_what_fits(models):
    m = Model(models / "float.tflite")
    with pytest.raises(UsageError, match="add a batch axis"):
        m.run(np.zeros((8, 8, 1), np.float32))
    with pytest.raises(UsageError, match="does not fit"):
        m.run(np.zeros((2, 9, 9, 1), np.float32))
    with pytest.raises(UsageError, match="dtype int16"):
        m.run(np.zeros((1, 8, 8, 1), np.int16))


def test_missing_or_broken_model_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Model(tmp_path / "nope.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(UsageError, match="cannot load TFLite model"):
        Model(bad)


def test_model_from_bytes(models):
    m = Model(content=(models / "float.tflite").read_bytes())
    assert m.run(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 3)


def test_quantize_round_trip():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    q = quantize(x, 1 / 127, 0, np.int8)
    np.testing.assert_allclose(dequantize(q, 1 / 127, 0), x, atol=0.5 / 127 + 1e-7)
    assert quantize(np.array([10.0]), 0.01, 0, np.int8)[0] == 127   # clipped, not wrapped
    info = TensorInfo.from_details({"name": "t", "index": 0, "shape": np.array([1, 2]), "dtype": np.int8,
                                    "quantization": (0.5, 3)})
    assert info.quantized and info.shape == (1, 2)
