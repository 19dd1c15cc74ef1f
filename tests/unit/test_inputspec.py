"""converter.inputspec: --preprocess, a Rescaling layer in the model, and the geometry a device follows."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from converter.inputspec import input_layer_scaling, make_preprocess, parse_preprocess, resolve
from protocol import manifest as mf
from protocol.errors import UsageError
from runtime.preprocess import Preprocessor


@pytest.mark.parametrize("text, mean, std, lo, hi", [
    ("scale=1/127.5,offset=-1", 127.5, 127.5, -1.0, 1.0),
    ("scale=1/255", 0.0, 255.0, 0.0, 1.0),
    ("range=-1:1", 127.5, 127.5, -1.0, 1.0),
    ("mean=127.5,std=127.5", 127.5, 127.5, -1.0, 1.0),
    # torchvision writes ImageNet's mean/std for pixel / 255: values all <= 1 are read that way
    ("mean=0.485,0.456,0.406,std=0.229,0.224,0.225", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375],
     -2.1179039, 2.64),
    ("mean=123.675:116.28:103.53,std=58.395:57.12:57.375", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375],
     -2.1179039, 2.64),
])
def test_preprocess_option_gives_mean_std_in_pixel_units(text, mean, std, lo, hi):
    pre = make_preprocess((8, 8, 3), **_mean_std(text))
    assert pre.mean == pytest.approx(mean) and pre.std == pytest.approx(std)
    assert pre.value_range == pytest.approx((lo, hi), abs=1e-6)


def _mean_std(text):
    from converter.inputspec import _mean_std

    mean, std = _mean_std(parse_preprocess(text), 3)
    return {"mean": mean, "std": std}


def test_geometry_keys_parse():
    opts = parse_preprocess("resize=110x110, crop=96x96, fit=cover, interpolation=bicubic")
    assert opts == {"resize": (110, 110), "crop": (96, 96), "fit": "cover", "resample": "bicubic"}
    assert parse_preprocess("resize=110") == {"resize": (110, 110)}
    assert parse_preprocess(None) == {} and parse_preprocess("  ") == {}


@pytest.mark.parametrize("text, words", [
    ("gamma=2", "unknown key 'gamma'"),
    ("scale=1/127.5,mean=0.5,std=0.5", "give one of scale/offset, mean/std or range, not several"),
    ("mean=0.5", "mean and std go together"),
    ("scale=abc", "scale=abc: not a number"),
    ("scale=1/0", "scale=1/0: not a number"),
    ("range=1:-1", "low must be below high"),
    ("resize=big", "give a size as WIDTHxHEIGHT"),
    ("fit=squash", "use stretch or cover"),
    ("resample=cubic", "use one of nearest, bilinear"),
    ("scale=2,scale=3", "scale is given twice"),
    ("127.5", "is not key=value"),
])
def test_bad_preprocess_options_are_usage_errors(text, words):
    with pytest.raises(UsageError, match=words) as err:
        parse_preprocess(text)
    assert err.value.exit_code == 2 and "--preprocess" in err.value.fix


def test_resize_then_centre_crop_and_cover_follow_pillow(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8), "RGB")   # 160 x 90, not square
    path = tmp_path / "photo.png"
    photo.save(path)

    crop = mf.InputSpec(shape=(32, 32, 3), dtype="float32",
                        preprocess=make_preprocess((32, 32, 3), resize=(40, 40), resample="bicubic"))
    assert crop.preprocess.crop == (32, 32)
    expect = np.asarray(photo.resize((40, 40), Image.Resampling.BICUBIC).crop((4, 4, 36, 36)), np.float32) / 255
    np.testing.assert_array_equal(Preprocessor(crop)(path), expect.astype(np.float32))

    cover = mf.InputSpec(shape=(32, 32, 3), dtype="float32", preprocess=make_preprocess((32, 32, 3), fit="cover"))
    expect = np.asarray(ImageOps.fit(photo, (32, 32), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_array_equal(Preprocessor(cover)(path), expect.astype(np.float32))
    # the aspect ratio is kept: a centred square of the photo, not a squashed photo
    squashed = Preprocessor(mf.InputSpec(shape=(32, 32, 3), dtype="float32",
                                         preprocess=make_preprocess((32, 32, 3))))(path)
    assert not np.array_equal(squashed, Preprocessor(cover)(path))


def test_bad_geometry_is_a_usage_error():
    with pytest.raises(UsageError, match="crop=90x90 must be the model's input size 96x96"):
        make_preprocess((96, 96, 3), crop=(90, 90))
    with pytest.raises(UsageError, match="resize=80x80 is smaller than the crop 96x96"):
        make_preprocess((96, 96, 3), resize=(80, 80))


from fixtures_core import require  # noqa: E402


@pytest.fixture(scope="module")
def keras():
    require("tensorflow")
    import keras

    return keras


def _classifier(keras, head_layers, shape=(16, 16, 3)):
    L = keras.layers
    inp = keras.Input(shape)
    x = inp
    for layer in head_layers:
        x = layer(x)
    x = L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(x))
    return keras.Model(inp, L.Dense(3, activation="softmax")(x))


def test_a_rescaling_or_normalization_layer_at_the_input_belongs_to_the_model(keras):
    L = keras.layers
    assert input_layer_scaling(_classifier(keras, [L.Rescaling(1 / 127.5, offset=-1)])) == "Rescaling"
    assert input_layer_scaling(_classifier(keras, [L.RandomFlip(), L.Rescaling(1 / 255)])) == "Rescaling"
    assert input_layer_scaling(_classifier(keras, [L.Normalization(mean=[120.0] * 3, variance=[900.0] * 3)])) \
        == "Normalization"
    assert input_layer_scaling(_classifier(keras, [])) is None
    block = keras.Sequential([L.Rescaling(1 / 255)], name="prep")
    assert input_layer_scaling(_classifier(keras, [block])) == "Rescaling"
    seq = keras.Sequential([keras.Input((16, 16, 1)), L.Rescaling(1 / 255), L.Flatten(), L.Dense(2)])
    assert input_layer_scaling(seq) == "Rescaling"

    # so the device sends plain pixels, and --preprocess is not needed (nor applied twice)
    r = resolve(_classifier(keras, [L.Rescaling(1 / 127.5, offset=-1)]))
    assert (r.spec.preprocess.mean, r.spec.preprocess.std) == (0.0, 1.0)
    assert r.spec.preprocess.value_range == (0.0, 255.0) and "Rescaling" in r.origin
    assert resolve(_classifier(keras, []), preprocess="scale=1/127.5,offset=-1").spec.preprocess.mean == 127.5
    r = resolve(_classifier(keras, []))
    assert r.spec.preprocess.value_range == (0.0, 1.0) and "default" in r.origin
    assert resolve(_classifier(keras, [], shape=(10, 12, 1))).spec.preprocess.color_mode == "L"


def test_the_usual_scaling_the_model_classifies_best_is_chosen(keras, tmp_path):
    # a "model" that answers right only for inputs in [-1, 1]: class = is the image bright?
    from converter.userdata import load_data

    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 215)):
        (tmp_path / name).mkdir()
        for i in range(12):
            a = np.clip(rng.normal(level, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a, "RGB").save(tmp_path / name / f"{i}.png")
    inp = keras.Input((16, 16, 3))
    mean = keras.ops.mean(inp, axis=(1, 2, 3))
    # bright (class 0, sorted first) when the mean is above 0: true only for [-1, 1] input
    out = keras.ops.stack([keras.ops.cast(mean > 0, "float32"), keras.ops.cast(mean <= 0, "float32")], axis=-1)
    model = keras.Model(inp, out)
    r = resolve(model, data=load_data(tmp_path))
    assert (r.spec.preprocess.mean, r.spec.preprocess.std) == (127.5, 127.5)
    assert "[-1, 1] (pixel / 127.5 - 1) 100.0 %" in r.origin
