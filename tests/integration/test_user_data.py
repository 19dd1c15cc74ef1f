"""A user's own small models and images from the command line: `convert --data`, grey and RGB, a Rescaling
layer, logits, and one clear error (exit 2) for every kind of bad data or unsupported model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_core import require  # noqa: E402

require("tensorflow")
import keras  # noqa: E402

from converter.inputspec import make_preprocess  # noqa: E402
from converter.userdata import load_data  # noqa: E402
from edgesplit.cli import main  # noqa: E402
from protocol import manifest as mf  # noqa: E402
from runtime.preprocess import Preprocessor  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
L = keras.layers
CLASSES = ["circle", "cross", "square", "triangle"]


def _fit(model, x, y, *, logits=False, epochs=8):
    keras.utils.set_random_seed(0)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=logits), metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def _small_cnn(shape, head_layers=(), *, softmax=True, n=4, name="user_cnn"):
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape, name="image")
    x = inp
    for layer in head_layers:
        x = layer(x)
    x = L.Conv2D(12, 3, padding="same", activation="relu", name="conv1")(x)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(2, name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(32, activation="relu", name="dense1")(x)
    out = L.Dense(n, activation="softmax" if softmax else None, name="out")(x)
    return keras.Model(inp, out, name=name)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def grey(tmp_path_factory, shapes):
    """A grey model (32x32x1, trained on pixel / 255) and its images as a flat folder with labels.csv (PNG)."""
    root = tmp_path_factory.mktemp("grey")
    images = shapes.write_shapes(root / "images", 60, seed=3, mode="L", suffix=".png", layout="labels.csv",
                                 sizes=((40, 36), (32, 32)))
    spec = mf.InputSpec(shape=(32, 32, 1), dtype="float32", preprocess=make_preprocess((32, 32, 1)))
    data = load_data(images).for_input(spec, progress=False)
    model = _fit(_small_cnn((32, 32, 1), name="grey_cnn"), data.x_train[:], data.y_train, epochs=25)
    path = root / "grey.keras"
    model.save(path)
    return types_ns(model=model, path=path, images=images, data=data)


def types_ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def test_grey_model_with_a_labels_csv_folder_from_the_command_line(grey, tmp_path, capsys):
    out = tmp_path / "b"
    code, printed, err = _cli(capsys, "convert", grey.path, "--cut", "pool1", "--data", grey.images, "--out", out)
    assert code == 0, err
    b = mf.load_bundle(f"{out}.tar.gz")
    m = b.manifest
    assert m.labels == CLASSES and m.output.kind == "probabilities"
    assert m.dataset == mf.Dataset(source=str(grey.images.resolve()), kind="labels.csv", n_train=192, n_test=48,
                                   test_split=0.2, seed=0)
    assert m.source_model == mf.SourceModel(file=str(grey.path.resolve()), sha256=mf.sha256_file(grey.path))
    assert m.calibration.n == 192 and "training images" in m.calibration.source   # all of them: fewer than 500
    # nothing in the model says how it scales pixels: the usual scalings were tried, pixel / 255 won
    pre = m.input.preprocess
    assert (pre.color_mode, pre.mean, pre.std) == ("L", 0.0, 255.0)
    assert "best of the usual scalings" in printed and "data     " in printed and "48 test" in printed
    # parity on the held-out fifth, which calibration never saw
    keras_acc = float(np.mean(grey.model.predict(grey.data.x_test[:], verbose=0).argmax(-1) == grey.data.y_test))
    assert m.parity.n == 48 and m.parity.agreement >= 0.95 and m.parity.keras_accuracy == pytest.approx(keras_acc)
    assert keras_acc >= 0.6
    # the device turns the PNG files into exactly what parity ran on
    test_files = load_data(grey.images).test.items
    np.testing.assert_array_equal(Preprocessor(m.input).batch(test_files), grey.data.x_test[:])
    # the rebuild command in errors reproduces the bundle from the command line
    cmd = m.convert_command()
    assert f"--data {grey.images.resolve()}" in cmd and "--test-split 0.2" in cmd and str(grey.path.resolve()) in cmd


def test_plan_sends_raw_images_at_what_the_users_files_weigh(grey, capsys):
    code, printed, err = _cli(capsys, "plan", grey.path, "--uplink", "1mbit", "--rtt", "40ms", "--data", grey.images,
                              "--json")
    assert code == 0, err
    raw = next(o for o in json.loads(printed)["options"] if o["name"] == "raw")
    files = list(load_data(grey.images).test.items)
    mean = np.mean([f.stat().st_size for f in files])
    assert "your image files" in raw["sources"]["bytes_up"] and raw["bytes_up"] == pytest.approx(mean + 60)


def test_without_data_a_user_model_is_refused_with_the_way_out(grey, tmp_path, capsys):
    code, _, err = _cli(capsys, "convert", grey.path, "--cut", "pool1", "--out", tmp_path / "b")
    assert code == 2 and "no calibration and test images are known" in err and "--data" in err
    assert "Traceback" not in err


def test_rescaling_layer_belongs_to_the_model_and_is_not_applied_twice(shapes, tmp_path, capsys):
    images = shapes.write_shapes(tmp_path / "rgb", 30, seed=5, sizes=((48, 40),))
    raw = mf.InputSpec(shape=(32, 32, 3), dtype="float32", preprocess=make_preprocess((32, 32, 3), 0.0, 1.0))
    data = load_data(images).for_input(raw, progress=False)        # plain pixels 0..255
    model = _fit(_small_cnn((32, 32, 3), [L.Rescaling(1 / 127.5, offset=-1, name="scale")], name="rescaled"),
                 data.x_train[:], data.y_train, epochs=10)
    path = tmp_path / "rescaled.keras"
    model.save(path)
    code, printed, err = _cli(capsys, "convert", path, "--cut", "conv2", "--data", images, "--out", tmp_path / "b")
    assert code == 0, err
    m = mf.load_bundle(tmp_path / "b").manifest
    pre = m.input.preprocess
    assert (pre.color_mode, pre.mean, pre.std, tuple(pre.value_range)) == ("RGB", 0.0, 1.0, (0.0, 255.0))
    assert "the model's own Rescaling layer" in printed
    keras_acc = float(np.mean(model.predict(data.x_test[:], verbose=0).argmax(-1) == data.y_test))
    assert m.parity.agreement >= 0.95 and m.parity.keras_accuracy == pytest.approx(keras_acc)
    # JPEG files through the device's decoding equal what parity checked, bit for bit
    files = load_data(images).test.items
    np.testing.assert_array_equal(Preprocessor(m.input).batch(files), data.x_test[:])


def test_logits_model_end_to_end_gives_probabilities(shapes, tmp_path, capsys, mosquitto_broker, cloud_command):
    images = shapes.write_shapes(tmp_path / "rgb", 25, seed=6, sizes=((36, 30), (32, 32)), suffix=".png")
    spec = mf.InputSpec(shape=(32, 32, 3), dtype="float32", preprocess=make_preprocess((32, 32, 3), 127.5, 127.5))
    data = load_data(images).for_input(spec, progress=False)
    model = _fit(_small_cnn((32, 32, 3), softmax=False, name="logit_cnn"), data.x_train[:], data.y_train,
                 logits=True, epochs=10)
    path = tmp_path / "logits.keras"
    model.save(path)
    code, printed, err = _cli(capsys, "convert", path, "--cut", "pool2", "--data", images, "--preprocess",
                              "scale=1/127.5,offset=-1", "--out", tmp_path / "b")
    assert code == 0, err
    m = mf.load_bundle(tmp_path / "b").manifest
    assert m.output.kind == "logits" and (m.input.preprocess.mean, m.input.preprocess.std) == (127.5, 127.5)
    assert "scaling from --preprocess" in printed

    files = [str(f) for f in load_data(images).test.items]
    cloud = cloud_command(mosquitto_broker.url, tmp_path / "b", json=False)
    cloud.wait_ready()
    dev = subprocess.run([sys.executable, "-m", "edgesplit", "device", "run", "--bundle", str(tmp_path / "b"),
                          "--broker", mosquitto_broker.url, "--device-id", "pi-logits", *files],
                         cwd=tmp_path, text=True, capture_output=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    cloud.stop()
    assert dev.returncode == 0, dev.stderr
    rows = {r["input"]: r for r in map(json.loads, dev.stdout.splitlines())}
    logits = model.predict(Preprocessor(m.input).batch(files), verbose=0)
    for f, z in zip(files, logits):
        r = rows[f]
        assert r["label"] == CLASSES[r["index"]]
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        # a probability, not a logit, from the int8 split: close to the softmax of the Keras logits
        assert 0.0 < r["probability"] <= 1.0 and r["probability"] == pytest.approx(p[r["index"]], abs=0.1)
    agree = np.mean([rows[f]["index"] == int(z.argmax()) for f, z in zip(files, logits)])
    assert agree >= 0.95


# ------------------------------------------------------------------ one clear error, exit 2

def _refused(capsys, *argv, words):
    code, _, err = _cli(capsys, *argv)
    assert code == 2, err
    for w in words:
        assert w in err, err
    assert err.count("error:") == 1 and "Traceback" not in err and "fix:" in err
    return err


def test_bad_data_from_the_command_line_is_one_error_with_exit_2(grey, shapes, tmp_path, capsys):
    conv = ("convert", grey.path, "--cut", "pool1", "--out", tmp_path / "b", "--data")
    (tmp_path / "empty").mkdir()
    _refused(capsys, *conv, tmp_path / "empty", words=["is empty"])
    # five classes for a model with four outputs
    five = tmp_path / "five"
    shutil.copytree(grey.images, five)
    (five / "labels.csv").write_text((five / "labels.csv").read_text().replace("img_0_000.png,circle",
                                                                               "img_0_000.png,ellipse"))
    _refused(capsys, *conv, five, words=["label 'triangle' is class 4", "has 4 outputs"])
    # a labels.csv naming a file that is not there
    gone = tmp_path / "gone"
    shutil.copytree(grey.images, gone)
    (gone / "img_1_003.png").unlink()
    _refused(capsys, *conv, gone, words=["names img_1_003.png, which is not in"])
    # more calibration images than there are training images
    _refused(capsys, *conv, grey.images, "--calibration", "1000",
             words=["--calibration 1000 asks for more images than the 192 training images"])
    # an unreadable image, named
    broken = tmp_path / "broken"
    shutil.copytree(grey.images, broken)
    for f in broken.glob("img_*.png"):
        f.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _refused(capsys, *conv, broken, words=["cannot read", "img_", "as an image"])
    # an .npz with the wrong keys, and channels that cannot be converted
    np.savez(tmp_path / "keys.npz", images=np.zeros((8, 32, 32), np.uint8))
    _refused(capsys, *conv, tmp_path / "keys.npz", words=["holds the arrays ['images']"])
    np.savez(tmp_path / "ch.npz", x=np.zeros((8, 32, 32, 6), np.uint8), y=np.arange(8) % 4)
    _refused(capsys, *conv, tmp_path / "ch.npz", words=["6 channels, which cannot be converted"])
    # too few images for a split
    one = shapes.write_shapes(tmp_path / "one", 1, sizes=((32, 32),), mode="L")
    for extra in list(one.iterdir())[1:]:
        shutil.rmtree(extra)
    _refused(capsys, *conv, one, words=["needs at least 2"])
    _refused(capsys, *conv, grey.images, "--test-split", "1.5", words=["--test-split must be a fraction"])
    _refused(capsys, *conv, grey.images, "--preprocess", "gamma=2", words=["unknown key 'gamma'"])


def test_models_edgesplit_cannot_split_are_one_error(tmp_path, capsys):
    from converter import bundle
    from protocol.errors import UsageError

    d = tmp_path / "d.npz"
    np.savez(d, x=np.zeros((20, 16, 16, 3), np.uint8), y=np.arange(20) % 2)
    inp = keras.Input((16, 16, 3))
    h = L.Conv2D(4, 3, name="conv")(inp)
    flat = L.GlobalAveragePooling2D(name="gap")(h)
    two_out = keras.Model(inp, [L.Dense(2, activation="softmax")(flat), L.Dense(3)(flat)])
    vector = keras.Sequential([keras.Input((12,)), L.Dense(4, name="d1"), L.Dense(2, name="d2")])
    for name, model, cut, words in (("two_out", two_out, "gap", ["has 2 outputs", "one output of class scores"]),
                                    ("vector", vector, "d1", ["which is not an image"])):
        path = tmp_path / f"{name}.keras"
        model.save(path)
        _refused(capsys, "convert", path, "--cut", cut, "--data", d, "--out", tmp_path / name, words=words)
    # a layer made of an op TFLite does not have (a Lambda cannot be loaded from a file safely: the API)
    erf = keras.Model(inp, L.Dense(2, activation="softmax")(
        L.Flatten()(L.Lambda(lambda t: keras.ops.erf(t), name="my_erf")(h))), name="erf_model")
    with pytest.raises(UsageError) as err:
        bundle.convert(erf, cut="conv", data=str(d), preprocess="range=0:1", out=tmp_path / "erf", progress=False)
    assert "layer 'my_erf' (Lambda) uses Erf" in err.value.message and "built-in ops" in err.value.message
    assert err.value.exit_code == 2 and err.value.fix


SMALL_AUDIT = ("--n", "40", "--attack-n", "4", "--iters", "30", "--decoder-epochs", "1")


def test_audit_of_a_users_model_and_of_its_bundle(grey, tmp_path, capsys):
    # `edgesplit audit my.keras --data D`: the report says which images, how split, how scaled
    code, printed, err = _cli(capsys, "audit", grey.path, "--data", grey.images, "--cuts", "pool1", *SMALL_AUDIT,
                              "--out", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["data"]["kind"] == "labels.csv" and report["data"]["classes"] == CLASSES
    assert (report["data"]["n_train"], report["data"]["n_test"]) == (192, 48)
    assert "seeded per-class split" in report["dataset"] and report["settings"]["data"] == str(grey.images.resolve())
    # a bundle whose model file has moved: the error names the file and the way out
    model = tmp_path / "models" / "grey.keras"
    model.parent.mkdir()
    shutil.copyfile(grey.path, model)
    assert _cli(capsys, "convert", model, "--cut", "pool1", "--data", grey.images, "--out", tmp_path / "b")[0] == 0
    moved = tmp_path / "elsewhere.keras"
    model.rename(moved)
    err = _refused(capsys, "audit", tmp_path / "b", *SMALL_AUDIT, "--out", tmp_path / "x",
                   words=[f"was made from {model}", "not on this machine", "--model FILE"])
    assert "sha256" in err
    # --model FILE, and the images the manifest names: no --data needed
    code, printed, err = _cli(capsys, "audit", tmp_path / "b", "--model", moved, *SMALL_AUDIT, "--out", tmp_path / "c")
    assert code == 0, err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert [c["name"] for c in report["cuts"]] == ["pool1"] and report["data"]["source"] == str(grey.images.resolve())


def test_tiny_and_camera_sized_inputs_from_an_npz(tmp_path):
    """8x8 grey and 224x224 RGB models convert from .npz pixels of other sizes; the device resizes the same way."""
    from converter import bundle

    rng = np.random.default_rng(0)
    for shape, size in (((8, 8, 1), (12, 10)), ((224, 224, 3), (160, 120))):
        h, w = size[1], size[0]
        x = rng.integers(0, 256, (40, h, w) + ((3,) if shape[-1] == 3 else ()), dtype=np.uint8)
        y = np.arange(40) % 3
        np.savez(tmp_path / "d.npz", x=x, y=y)
        keras.utils.set_random_seed(0)
        inp = keras.Input(shape)
        hdn = L.Conv2D(4, 3, strides=1 if shape[0] == 8 else 4, activation="relu", name="conv")(inp)
        model = keras.Model(inp, L.Dense(3, activation="softmax", name="out")(L.GlobalAveragePooling2D(name="gap")(hdn)),
                            name=f"m{shape[0]}")
        out = tmp_path / f"b{shape[0]}"
        result = bundle.convert(model, cut="conv", data=str(tmp_path / "d.npz"), preprocess="range=0:1",
                                out=out, progress=False)
        m = result.manifest
        assert m.input.shape == shape and m.dataset.kind == "npz" and (m.dataset.n_train, m.dataset.n_test) == (32, 8)
        assert result.parity.agreement >= 0.75
        # the device's numpy path resizes an (H, W) uint8 image as the converter did
        from converter.userdata import load_data

        d = load_data(tmp_path / "d.npz")
        np.testing.assert_array_equal(Preprocessor(m.input).arrays(d.test.items),
                                      d.for_input(m.input, progress=False).x_test[:])


def test_demo_with_a_users_model_and_images_prints_the_demo_table(grey, tmp_path):
    from converter import cuts
    from edgesplit.demo import default_cut

    # without --cut: the fewest bytes sent with at most half the compute on the device
    name, why = default_cut(grey.model)
    found = {c.name: c for c in cuts.list_cuts(grey.model)}
    assert name in found and found[name].head_macs <= (found[name].head_macs + found[name].tail_macs) / 2
    assert "--cut to choose" in why
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "edgesplit", "demo", "--model", str(grey.path), "--data",
                           str(grey.images), "--cut", "pool2", "--out", str(tmp_path / "demo")],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("model / cut / quant", "images sent / answered", "accuracy (end to end)",
                "accuracy (head+tail run here)", "accuracy (Keras model)", "latency p50 / p95 / p99", "throughput",
                "bytes sent per image (frame)", "raw image (uint8) / PNG", "data"):
        assert row in out, out
    assert "48 / 48" in out and "grey" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["images"] == 48 and summary["correct"] == summary["expected_correct"]
    assert abs(summary["correct"] - summary["keras_correct"]) <= 2
