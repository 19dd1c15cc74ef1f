"""Reconstruction attacks on a tiny model: shallow cuts give the input back, deep cuts do not."""
import pytest

from auditor import invert, metrics


@pytest.fixture(scope="module")
def tiny():
    import keras

    from converter.datasets import synthetic_images

    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 5, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="dense1")(h)
    out = keras.layers.Dense(10, activation="softmax", name="dense2")(h)
    x, _ = synthetic_images(400, seed=3)
    return keras.Model(inp, out), x


def test_whitebox_inversion_of_a_shallow_cut_beats_a_deep_cut(tiny):
    model, x = tiny
    x = x[:24]
    psnr = {}
    for cut in ("conv1", "dense2"):
        head = invert.head_of(model, cut)
        target = head.predict(x, verbose=0)
        rec = invert.whitebox_invert(head, target, iters=150, lr=2e-2)
        assert rec.shape == x.shape and rec.min() >= 0.0 and rec.max() <= 1.0
        psnr[cut] = metrics.psnr(x, rec).mean()
    assert psnr["conv1"] > 25.0
    assert psnr["conv1"] > psnr["dense2"] + 10.0


def test_whitebox_settings_are_checked():
    with pytest.raises(ValueError, match="start"):
        invert.WhiteboxSettings(start="noise")
    with pytest.raises(ValueError, match="iters"):
        invert.WhiteboxSettings(iters=0)


def test_tv_weight_grows_with_depth():
    weights = [invert.tv_for_depth(f) for f in (0.0, 0.5, 1.0)]
    assert weights[0] == 0.0 and weights[0] < weights[1] < weights[2]


def test_learned_decoder_trained_on_other_images_reads_shallow_features_better(tiny):
    model, x = tiny
    train, attacked = x[:320], x[320:]
    psnr = {}
    for cut in ("pool1", "dense2"):
        head = invert.head_of(model, cut)
        dec = invert.train_decoder(head.predict(train, verbose=0), train, epochs=8, seed=0)
        rec = dec.decode(head.predict(attacked, verbose=0))
        assert rec.shape == attacked.shape
        psnr[cut] = metrics.psnr(attacked, rec).mean()
    assert psnr["pool1"] > psnr["dense2"] + 2.0


@pytest.mark.parametrize("feature_shape", [(28, 28, 4), (14, 14, 4), (7, 7, 8), (5, 5, 2), (32,), (10,)])
def test_decoder_fits_any_feature_shape(feature_shape):
    dec = invert.build_decoder(feature_shape, (28, 28, 1))
    assert tuple(dec.output_shape[1:]) == (28, 28, 1)
