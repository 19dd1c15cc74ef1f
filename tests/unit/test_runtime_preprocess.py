"""runtime.preprocess: image files and arrays become exactly what the head was made for."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fixtures_core import require
from protocol import manifest as mf
from protocol.errors import UsageError
from runtime.preprocess import Preprocessor, preprocess_file

MNIST_SPEC = mf.InputSpec(shape=(28, 28, 1), dtype="float32",
                          preprocess=mf.Preprocess(color_mode="L", resize=(28, 28)))


def _write_pngs(x: np.ndarray, folder) -> list:
    """float images k/255 -> 8-bit greyscale PNGs, as a user would have them."""
    paths = []
    for i, img in enumerate(x):
        k = np.round(img[..., 0] * 255).astype(np.uint8)
        p = folder / f"{i:04d}.png"
        Image.fromarray(k, "L").save(p)
        paths.append(p)
    return paths


def test_mnist_png_equals_the_dataset_array(tmp_path):
    x = np.asarray(require("mnist").x_test[:64])
    paths = _write_pngs(x, tmp_path)
    p = Preprocessor(MNIST_SPEC)
    got = p.batch(paths)
    assert got.dtype == np.float32 and got.shape == (64, 28, 28, 1)
    np.testing.assert_array_equal(got, x)
    # and the array path gives the same, as float input and as uint8 pixels
    np.testing.assert_array_equal(p.arrays(x), x)
    np.testing.assert_array_equal(p.arrays(np.round(x * 255).astype(np.uint8)), x)


def test_synthetic_mnist_like_pngs(tmp_path):
    from converter import datasets

    x, _ = datasets.synthetic_images(16, seed=3)
    x = datasets.to_float(np.round(x * 255).astype(np.uint8))  # the k/255 grid real images live on
    paths = _write_pngs(x, tmp_path)
    np.testing.assert_array_equal(Preprocessor(MNIST_SPEC).batch(paths), x)
    np.testing.assert_array_equal(preprocess_file(MNIST_SPEC, paths[0]), x[0])


def test_colour_photo_of_another_size_is_converted_and_resized_like_pillow_does(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb, "RGB").save(path, quality=95)
    expect = np.asarray(Image.open(path).convert("L").resize((28, 28), Image.Resampling.BILINEAR),
                        np.float32)[..., None] / np.float32(255)
    np.testing.assert_array_equal(Preprocessor(MNIST_SPEC)(path), expect)


def test_rgb_spec_with_per_channel_mean_and_std(tmp_path):
    spec = mf.InputSpec(shape=(4, 6, 3), dtype="float32",
                        preprocess=mf.Preprocess(color_mode="RGB", resize=(6, 4), resample="nearest",
                                                 mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5],
                                                 value_range=(-1.0, 1.0)))
    px = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(px, "RGB").save(tmp_path / "a.png")
    x = Preprocessor(spec)(tmp_path / "a.png")
    assert x.shape == (4, 6, 3)
    np.testing.assert_allclose(x, (px.astype(np.float32) - 127.5) / 127.5, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    # a greyscale file becomes three equal channels
    Image.fromarray(px[..., 0], "L").save(tmp_path / "g.png")
    g = Preprocessor(spec)(tmp_path / "g.png")
    np.testing.assert_array_equal(g[..., 0], g[..., 2])


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((28, 28), np.uint8)
    img[:, :4] = 255   # a bar on the left
    pil = Image.fromarray(img, "L")
    exif = pil.getexif()
    exif[0x0112] = 6   # "rotate 90 CW to display"
    pil.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = Preprocessor(MNIST_SPEC)(tmp_path / "rot.jpg")[..., 0]
    assert x[:4, :].mean() > 0.8 and x[:, :4].mean() < 0.5   # the bar is now on top


def test_uint8_arrays_of_another_size_are_resized():
    a = np.full((56, 56), 200, np.uint8)
    x = Preprocessor(MNIST_SPEC).array(a)
    assert x.shape == (28, 28, 1)
    np.testing.assert_allclose(x, 200 / 255, rtol=1e-6)


def test_float_arrays_outside_the_range_are_refused():
    p = Preprocessor(MNIST_SPEC)
    with pytest.raises(UsageError, match="looks like 0..255 pixels"):
        p.array(np.full((28, 28), 200.0, np.float32))
    with pytest.raises(UsageError, match="does not fit"):
        p.array(np.zeros((30, 30), np.float32))
    with pytest.raises(UsageError, match="NaN"):
        p.arrays(np.full((2, 28, 28, 1), np.nan, np.float32))
    with pytest.raises(UsageError, match="uint8 pixels or float"):
        p.array(np.zeros((28, 28), np.int64))


def test_unreadable_and_missing_files(tmp_path):
    p = Preprocessor(MNIST_SPEC)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UsageError, match="cannot read .*notes.png as an image"):
        p(tmp_path / "notes.png")
    with pytest.raises(UsageError, match="does not exist"):
        p(tmp_path / "gone.png")
    with pytest.raises(UsageError, match="cannot preprocess a dict"):
        p({"x": 1})


def test_sixteen_bit_greyscale_keeps_its_contrast(tmp_path):
    a16 = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 83).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "deep.png")
    x = Preprocessor(MNIST_SPEC)(tmp_path / "deep.png")
    np.testing.assert_array_equal(x[..., 0], (a16 >> 8).astype(np.float32) / np.float32(255))
