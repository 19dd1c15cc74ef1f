"""Reconstruction metrics against values worked out by hand."""
import numpy as np
import pytest

from auditor import metrics


def test_psnr_of_a_known_error_is_20_db():
    a = np.zeros((2, 8, 8, 1))
    b = np.full((2, 8, 8, 1), 0.1)  # MSE 0.01 -> 10*log10(1/0.01) = 20 dB
    assert metrics.mse(a, b) == pytest.approx([0.01, 0.01])
    assert metrics.psnr(a, b) == pytest.approx([20.0, 20.0])


def test_psnr_of_a_perfect_copy_is_capped_not_infinite():
    a = np.random.default_rng(0).random((3, 28, 28, 1))
    assert np.all(metrics.psnr(a, a) == metrics.PSNR_CAP_DB)


def test_ssim_of_an_image_with_itself_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(1)
    a = rng.random((4, 28, 28, 1))
    assert metrics.ssim(a, a) == pytest.approx(np.ones(4), abs=1e-5)
    noisy = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    assert np.all(metrics.ssim(a, noisy) < 0.8)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    # Flat images have no variance, so SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01*1)^2.
    a = np.full((1, 28, 28, 1), 0.5)
    b = np.full((1, 28, 28, 1), 0.25)
    c1 = 0.01 ** 2
    want = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    assert metrics.ssim(a, b)[0] == pytest.approx(want, abs=5e-4)  # TF windowing: ~2e-4 off


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 5, 1)))


def test_reconstruction_metrics_reports_accuracy_and_agreement():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    x = np.random.default_rng(2).random((16, 8, 8, 1)).astype(np.float32)
    seen = metrics.predict_labels(model, x)
    got = metrics.reconstruction_metrics(x, x, model=model, labels=seen)
    assert got["accuracy"] == 1.0 and got["agreement"] == 1.0
    assert got["psnr_db"] == metrics.PSNR_CAP_DB and got["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_an_independent_reader_reads_originals_but_not_noise():
    from converter.datasets import synthetic_images

    x, y = synthetic_images(600, seed=5)
    judge = metrics.train_judge(x[:500], y[:500], seed=0, epochs=5)
    test_x, test_y = x[500:], y[500:]
    good = metrics.reconstruction_metrics(test_x, test_x, labels=test_y, judge=judge)
    noise = np.random.default_rng(0).random(test_x.shape).astype(np.float32)
    bad = metrics.reconstruction_metrics(test_x, noise, labels=test_y, judge=judge)
    assert good["judge_accuracy"] > 0.8
    assert bad["judge_accuracy"] < good["judge_accuracy"] - 0.4
    assert good["accuracy"] is None  # no model given
