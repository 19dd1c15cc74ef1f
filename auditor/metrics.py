"""How good a reconstruction is: MSE, PSNR, SSIM, and whether the model still reads it.

Images are float arrays in [0, 1] of shape (N, H, W, C).  Every function returns
one value per image so that callers can average or look at the spread; the
``summarize`` helper does the usual averaging.
"""
from __future__ import annotations

import logging
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

#: PSNR of a perfect reconstruction is infinite; we cap it so averages stay finite.
PSNR_CAP_DB = 100.0


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 3:  # one channel dropped: (N, H, W)
        a, b = a[..., None], b[..., None]
    if a.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {a.shape}")
    return a, b


def mse(original, reconstruction) -> np.ndarray:
    """Mean squared error per image."""
    a, b = _pair(original, reconstruction)
    return ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)


def psnr(original, reconstruction) -> np.ndarray:
    """Peak signal-to-noise ratio per image, in dB: 10·log10(1 / MSE) for [0, 1] images."""
    err = mse(original, reconstruction)
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    return 10.0 * np.log10(1.0 / np.maximum(err, floor))


def ssim(original, reconstruction) -> np.ndarray:
    """Structural similarity per image (tf.image.ssim, Gaussian window, max_val 1).

    The window is 11 pixels (the usual choice) or the image side when smaller.
    """
    import tensorflow as tf

    a, b = _pair(original, reconstruction)
    side = min(11, a.shape[1], a.shape[2])
    values = tf.image.ssim(tf.constant(a, tf.float32), tf.constant(b, tf.float32), max_val=1.0,
                           filter_size=side)
    return np.asarray(values, dtype=np.float64)


def predict_labels(model, images, batch_size: int = 256) -> np.ndarray:
    """Class the model assigns to each image (argmax of its output)."""
    out = model.predict(np.asarray(images, np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(out).argmax(axis=-1)


def train_judge(x, y, *, seed: int = 0, epochs: int = 3, n_classes: int | None = None):
    """An independent reader of reconstructions: a small MLP on pixels (784-256-10), Adam, seeded.

    The audited model is a biased judge of white-box reconstructions: they are optimised to
    give the same features, hence (at the last layers) the same class, even when they look like
    noise.  A second model of another family, trained on the training images, says whether a
    reconstruction still *reads* as the digit.
    """
    import keras

    x = np.asarray(x, np.float32)
    y = np.asarray(y).reshape(-1)
    n_classes = n_classes or int(y.max()) + 1
    keras.utils.set_random_seed(seed)
    judge = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Flatten(),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(n_classes, activation="softmax")], name="judge_mlp")
    judge.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    judge.fit(x, y, batch_size=128, epochs=epochs, verbose=0, shuffle=True)
    return judge


def reconstruction_metrics(original, reconstruction, *, model=None, labels=None, judge=None) -> dict:
    """Averages over images: MSE, PSNR (dB), SSIM, and how the reconstructions are read.

    ``accuracy``: the audited ``model``'s accuracy on the reconstructions against ``labels``;
    ``agreement``: against the model's own reading of the originals; ``judge_accuracy``:
    an independent ``judge``'s accuracy (see :func:`train_judge`).  None when not given.
    """
    err = mse(original, reconstruction)
    p = psnr(original, reconstruction)
    out = {
        "n": int(len(err)),
        "mse": float(err.mean()),
        "psnr_db": float(p.mean()),
        "psnr_db_std": float(p.std()),
        "ssim": float(ssim(original, reconstruction).mean()),
        "accuracy": None,
        "agreement": None,
        "judge_accuracy": None,
    }
    truth = None if labels is None else np.asarray(labels).reshape(-1)
    if model is not None:
        seen = predict_labels(model, reconstruction)
        if truth is not None:
            out["accuracy"] = float((seen == truth).mean())
        out["agreement"] = float((seen == predict_labels(model, original)).mean())
    if judge is not None and truth is not None:
        out["judge_accuracy"] = float((predict_labels(judge, reconstruction) == truth).mean())
    return out
