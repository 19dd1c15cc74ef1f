"""``convert`` on small real Keras models: real TF conversion, real LiteRT parity, real bundles."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_core import require

require("tensorflow")
Interpreter = require("litert").Interpreter
import keras  # noqa: E402

from converter import bundle, datasets  # noqa: E402
from protocol import manifest as mf  # noqa: E402
from protocol.errors import CheckFailed, UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
L = keras.layers


@pytest.fixture(scope="module")
def shapes():
    """Synthetic labelled images in MNIST's layout (train for calibration, test for parity)."""
    x_train, y_train = datasets.synthetic_images(1200, seed=0)
    x_test, y_test = datasets.synthetic_images(300, seed=1)
    return datasets.Mnist(x_train, y_train, x_test, y_test)


def _train(model, data, *, logits=False):
    keras.utils.set_random_seed(0)
    # a model that ends in logits must be trained as such: read as probabilities it diverges
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    model.fit(data.x_train, data.y_train, epochs=3, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def seq_model(shapes):
    keras.utils.set_random_seed(0)
    return _train(keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        L.MaxPooling2D(2, name="pool1"),
        L.Conv2D(8, 3, padding="same", activation="relu", name="conv2"),
        L.MaxPooling2D(2, name="pool2"),
        L.Flatten(name="flatten"),
        L.Dense(24, activation="relu", name="dense1"),
        L.Dense(10, activation="softmax", name="dense2"),
    ], name="seq_cnn"), shapes)


@pytest.fixture(scope="module")
def res_model(shapes):
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = L.Conv2D(8, 3, padding="same", activation="relu", name="res_a")(x)
    y = L.Conv2D(8, 3, padding="same", name="res_b")(y)
    x = L.Add(name="res_add")([x, y])
    x = L.Activation("relu", name="res_relu")(x)
    x = L.MaxPooling2D(4, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(24, activation="relu", name="dense1")(x)
    out = L.Dense(10, name="logits")(x)  # no softmax: the output is logits
    return _train(keras.Model(inp, out, name="res_cnn"), shapes, logits=True)


def _interpreter(path):
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


CASES = [
    ("seq", "pool1", "int8"), ("seq", "pool1", "float16"), ("seq", "pool1", "dynamic"), ("seq", "pool1", "none"),
    ("seq", "conv1", "int8"), ("seq", "dense1", "int8"), ("seq", "dense2", "int8"),
    ("res", "stem", "int8"), ("res", "res_add", "none"), ("res", "res_relu", "int8"), ("res", "pool", "dynamic"),
]


@pytest.mark.parametrize("which, cut, quant", CASES)
def test_convert_writes_a_bundle_that_agrees_with_keras(which, cut, quant, seq_model, res_model, shapes,
                                                        tmp_path):
    model = seq_model if which == "seq" else res_model
    out = tmp_path / f"{which}-{cut}-{quant}"
    result = bundle.convert(model, cut=cut, quant=quant, calibration=100, out=out, parity_n=300, data=shapes,
                            labels=datasets.SYNTHETIC_LABELS, progress=False)
    m = result.manifest

    # the directory and the tarball beside it both load and verify, with the same id
    assert result.bundle_dir == out and result.tarball == tmp_path / f"{out.name}.tar.gz"
    b = mf.load_bundle(out)
    assert b.manifest == m and mf.load_bundle(result.tarball).bundle_id == m.bundle_id
    assert set(m.files) == {"head.tflite", "tail.tflite", "probe.npz"} and m.probe.file == "probe.npz"
    # the self-test a device runs on the head and a worker on the tail before they switch to it
    from runtime.probe import check_head, check_tail
    from runtime.split import Head, Tail

    assert check_head(Head(b), b).ok and check_tail(Tail(b), b).ok
    assert (m.model, m.cut, m.quant) == (model.name, cut, quant)
    assert m.labels == datasets.SYNTHETIC_LABELS
    assert m.output.kind == ("probabilities" if which == "seq" else "logits")

    # the real head sends what the manifest says: int8 with its scale/zero point, or float32
    head = _interpreter(b.head_path)
    h_in, h_out = head.get_input_details()[0], head.get_output_details()[0]
    assert np.dtype(h_in["dtype"]) == np.float32 and m.input.dtype == "float32"
    assert tuple(h_out["shape"][1:]) == m.feature.shape == tuple(model.get_layer(cut).output.shape[1:])
    if quant == "int8":
        assert np.dtype(h_out["dtype"]) == np.int8 and m.feature.dtype == "int8"
        assert h_out["quantization"] == pytest.approx((m.feature.scale, m.feature.zero_point))
        assert m.calibration.n == 100 and "training" in m.calibration.source
        assert result.requant_exact in (True, None)  # None only when the tail has no ops (cut at the output)
    else:
        assert np.dtype(h_out["dtype"]) == np.float32 and m.feature.scale is None and m.calibration is None
    tail = _interpreter(b.tail_path)
    assert np.dtype(tail.get_input_details()[0]["dtype"]) == np.float32

    # one image by hand, the way a device and a cloud worker do it
    x = shapes.x_test[:1]
    head.set_tensor(h_in["index"], x)
    head.invoke()
    sent = m.feature.check(head.get_tensor(h_out["index"]))
    tail.set_tensor(tail.get_input_details()[0]["index"], m.feature.dequantize(sent))
    tail.invoke()
    answer = tail.get_tensor(tail.get_output_details()[0]["index"])
    assert np.argmax(answer) == np.argmax(model.predict(x, verbose=0))

    # parity was measured with LiteRT on the held-out images and written into the manifest
    p = m.parity
    assert p.n == 300 and p.passed and p.interpreter.startswith("ai-edge-litert")
    assert p.agreement == result.agreement >= 0.98
    assert p.accuracy == pytest.approx(p.keras_accuracy, abs=0.02)
    assert result.head_bytes == b.head_path.stat().st_size and result.tail_bytes == b.tail_path.stat().st_size
    text = result.summary()
    assert m.bundle_id in text and "PASSED" in text and "head.tflite" in text


def test_reconverting_replaces_the_bundle_and_is_reproducible(seq_model, shapes, tmp_path):
    out = tmp_path / "b"
    kw = dict(cut="pool2", quant="int8", calibration=50, out=out, parity_n=100, data=shapes, progress=False)
    first = bundle.convert(seq_model, **kw)
    (out / "stale.txt").write_text("left over")
    second = bundle.convert(seq_model, **kw)
    assert not (out / "stale.txt").exists()
    assert second.bundle_id == first.bundle_id  # same model, cut, data and tools: same content hash
    assert mf.load_bundle(second.tarball).bundle_id == second.bundle_id


def test_keras_tail_is_optional_and_verified(seq_model, shapes, tmp_path):
    result = bundle.convert(seq_model, cut="pool2", quant="none", calibration=10, out=tmp_path / "k",
                            parity_n=50, data=shapes, keras_tail=True, progress=False)
    b = mf.load_bundle(result.tarball)
    assert b.tail_keras_path is not None and "tail.keras" in b.manifest.files
    tail = keras.saving.load_model(b.tail_keras_path)
    feats = keras.Model(seq_model.inputs[0], seq_model.get_layer("pool2").output)(shapes.x_test[:8])
    np.testing.assert_allclose(tail(feats), seq_model(shapes.x_test[:8]), atol=1e-5)


def test_bad_calibration_fails_parity_with_a_clear_message(seq_model, shapes, tmp_path):
    # all-black calibration images: the int8 range of the features collapses and the split disagrees
    out = tmp_path / "bad"
    with pytest.raises(CheckFailed) as err:
        bundle.convert(seq_model, cut="conv2", quant="int8", calibration=np.zeros((4, 28, 28, 1), np.float32),
                       out=out, parity_n=300, data=shapes, min_agreement=0.99, progress=False)
    assert "agree with the Keras model on only" in err.value.message and "required 99.00 %" in err.value.message
    assert err.value.exit_code == 1 and "--calibration" in err.value.fix
    # the failed bundle is kept for inspection, marked failed, and not packed
    m = mf.load_bundle(out).manifest
    assert m.parity.passed is False and m.parity.agreement < 0.99 and m.parity.min_agreement == 0.99
    assert not (tmp_path / "bad.tar.gz").exists()


@pytest.mark.parametrize("cut, words", [
    ("res_a", ["'res_a'", "not a valid cut", "valid cuts:", "res_add"]),
    ("res_b", ["not a valid cut"]),
    ("nope", ["has no layer 'nope'"]),
])
def test_invalid_cuts_are_usage_errors(cut, words, res_model, shapes, tmp_path):
    with pytest.raises(UsageError) as err:
        bundle.convert(res_model, cut=cut, quant="int8", out=tmp_path / "x", data=shapes, progress=False)
    for w in words:
        assert w in err.value.message
    assert err.value.exit_code == 2 and not (tmp_path / "x").exists()


def test_user_mistakes_are_usage_errors(seq_model, shapes, tmp_path):
    kw = dict(cut="pool1", data=shapes, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        bundle.convert(seq_model, out=tmp_path / "file", **kw)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="holds other files, not a bundle"):
        bundle.convert(seq_model, out=tmp_path / "busy", **kw)
    assert (tmp_path / "busy" / "thesis.tex").exists()
    with pytest.raises(UsageError, match="names a tarball"):
        bundle.convert(seq_model, out=tmp_path / "b.tar.gz", **kw)
    with pytest.raises(UsageError, match="unknown quantization 'int4'"):
        bundle.convert(seq_model, quant="int4", out=tmp_path / "q", **kw)
    with pytest.raises(UsageError, match="--calibration must be at least 1"):
        bundle.convert(seq_model, calibration=0, out=tmp_path / "c", **kw)
    with pytest.raises(UsageError, match="--min-agreement must be a fraction"):
        bundle.convert(seq_model, min_agreement=99, out=tmp_path / "m", **kw)
    with pytest.raises(UsageError, match="model file not found"):
        bundle.convert(str(tmp_path / "missing.keras"), cut="pool1", out=tmp_path / "n")
    vector = keras.Sequential([keras.Input((16,)), L.Dense(8, name="d1"), L.Dense(2, name="d2")])
    with pytest.raises(UsageError, match="not an image"):
        bundle.convert(vector, cut="d1", out=tmp_path / "v", data=shapes)


def test_cli_convert(seq_model, tmp_path, capsys):
    """The command a user types, on a .keras file (MNIST-shaped, so MNIST supplies the images)."""
    path = tmp_path / "seq.keras"
    seq_model.save(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "edgesplit", "convert", str(path), "--quant", "int8", "--calibration", "50",
           "--parity-n", "200", "--out", str(tmp_path / "cli")]
    ok = subprocess.run(cmd + ["--cut", "pool2"], capture_output=True, text=True, timeout=600, env=env)
    assert ok.returncode == 0, ok.stderr
    b = mf.load_bundle(tmp_path / "cli.tar.gz")
    assert b.manifest.model == "seq" and b.manifest.parity.n == 200 and "mnist" in b.manifest.parity.source
    assert b.bundle_id in ok.stdout and "agreement" in ok.stdout
    # a mistake: exit code 2, one message with the valid cuts, no traceback (in-process: same code path)
    from edgesplit.cli import main

    assert main(cmd[3:] + ["--cut", "flatten"]) == 2
    err = capsys.readouterr().err
    assert "error: layer 'flatten'" in err and "valid cuts:" in err and "Traceback" not in err
