"""Reconstruction attacks on the features a device sends.

Two attackers, as in the literature the design cites:

* **white-box inversion** (Tuor et al. eq. 1, Mahendran & Vedaldi; settings from He,
  Zhang & Lee, ACSAC 2019): the attacker knows the head and solves
  x* = argmin_x ‖b(x) − t‖² + λ_TV·TV(x) by Adam from a neutral start, x clipped to [0, 1]
  after every step.  ``t`` is the feature the device really sent (dequantized int8).
* **learned inversion** (He et al.'s inverse network): a small decoder trained with MSE
  to map sent features back to images, on the attacker's own images — never the ones
  attacked.

Both run batched over many images at once so they are usable on a 2-core machine.
"""
from __future__ import annotations

import logging
import math
import os
import types
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

#: Where the white-box search starts.  "grey" (0.5 everywhere) is the default: a black
#: image, He et al.'s choice, is a stationary point of any head whose first layer is a
#: ReLU convolution with bias <= 0 (pre-activations exactly 0, zero gradient), so the
#: search never leaves it; "zeros" is kept for comparison with their code.
STARTS = ("grey", "zeros")


def head_of(model, cut: str):
    """The Keras head of ``model``: the sub-model from its input to layer ``cut``'s output."""
    import keras

    return keras.Model(model.inputs, model.get_layer(cut).output, name=f"head_{cut}")


def tv_for_depth(fraction: float, tv_max: float = 0.5) -> float:
    """Default total-variation weight for a cut at relative depth ``fraction`` (0 = first layer).

    Zero at the first layer, where the features pin the image down, growing as
    ``tv_max · fraction^1.5`` to ``tv_max`` at the last layer, where many images share one
    feature and the prior has to choose (He et al. grow theirs from 0 to 1e3–1e4; ours
    multiplies a relative feature loss, see :func:`whitebox_invert`, hence smaller numbers).
    Tuned on paper-cnn at 300 iterations: conv1 is best without TV, conv2/pool2 gain 2–3 dB
    from 0.1, dense1 about 2.5 dB from 0.5.
    """
    fraction = min(max(float(fraction), 0.0), 1.0)
    return float(tv_max * fraction ** 1.5)


@dataclass(frozen=True)
class WhiteboxSettings:
    iters: int = 300
    lr: float = 1e-2
    tv: float = 0.0
    start: str = "grey"
    batch_size: int = 128

    def __post_init__(self):
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.tv < 0:
            raise ValueError(f"tv must be >= 0, got {self.tv}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")


def _total_variation(x):
    """Isotropic total variation per image, averaged over pixels (smoothed at 0)."""
    import tensorflow as tf

    dy = x[:, 1:, :-1, :] - x[:, :-1, :-1, :]
    dx = x[:, :-1, 1:, :] - x[:, :-1, :-1, :]
    return tf.reduce_mean(tf.sqrt(dx * dx + dy * dy + 1e-8), axis=[1, 2, 3])


def whitebox_invert(head, targets, *, iters: int = 300, lr: float = 1e-2, tv: float = 0.0,
                    start: str = "grey", batch_size: int = 128, progress: bool = False,
                    desc: str = "white-box", low=0.0, high=1.0, mask_zeros: bool = False,
                    weight=None) -> np.ndarray:
    """Reconstruct inputs from features ``targets`` by gradient descent on the Keras ``head``.

    Per image the loss is ‖b(x) − t‖² / ‖t‖² + tv·TV(x): the feature error divided by the
    target's energy (a constant per image, so for tv = 0 the minimiser is exactly eq. 1's;
    it only makes one ``tv`` weight mean the same at every layer).  Adam (β = 0.9, 0.999)
    with step ``lr``; x is clipped to [0, 1] after every step.  Images are solved
    independently, many per batch.  Returns float32 images shaped like the head's input.

    ``low`` / ``high`` (scalars or per channel) bound the model's input (pixels 0 and 255 after
    preprocessing); "grey" starts half way, "zeros" at the black image.  ``mask_zeros`` compares
    only the entries of ``t`` that are not 0 (against a dropout at the cut, whose dropped entries
    say nothing about the input).  ``weight`` (broadcast to the feature shape, e.g. per channel)
    weighs each entry's squared error: 1/sigma^2 against Gaussian noise of scale sigma at the cut.
    """
    import tensorflow as tf

    settings = WhiteboxSettings(iters=iters, lr=lr, tv=tv, start=start, batch_size=batch_size)
    targets = np.asarray(targets, np.float32)
    in_shape = tuple(int(d) for d in head.input_shape[1:])
    out_shape = tuple(int(d) for d in head.output_shape[1:])
    if targets.shape[1:] != out_shape:
        targets = targets.reshape((len(targets),) + out_shape)
    low = np.broadcast_to(np.asarray(low, np.float32), in_shape[-1:]).astype(np.float32)
    high = np.broadcast_to(np.asarray(high, np.float32), in_shape[-1:]).astype(np.float32)
    fill = low if settings.start == "zeros" else (low + high) / 2
    lo_t, hi_t = tf.constant(low), tf.constant(high)
    w = np.ones(out_shape, np.float32) if weight is None else np.broadcast_to(np.asarray(weight, np.float32), out_shape)
    w_t = tf.constant(w / max(float(w.mean()), 1e-30))  # mean 1: the loss keeps its scale
    scale_tv = float(np.mean(high - low)) or 1.0  # TV of pixels in [0, 1], whatever the input scale
    b1, b2, eps = 0.9, 0.999, 1e-8
    feat_axes = list(range(1, 1 + len(out_shape)))

    x = tf.Variable(tf.zeros((1,) + in_shape), shape=tf.TensorShape((None,) + in_shape))
    m = tf.Variable(tf.zeros((1,) + in_shape), shape=tf.TensorShape((None,) + in_shape))
    v = tf.Variable(tf.zeros((1,) + in_shape), shape=tf.TensorShape((None,) + in_shape))
    t_count = tf.Variable(0.0)

    @tf.function(reduce_retracing=True)
    def run(target, steps):
        keep = tf.cast(tf.not_equal(target, 0.0), tf.float32) if mask_zeros else tf.ones_like(target)
        keep = keep * w_t
        energy = tf.reduce_mean(target * target, axis=feat_axes) + 1e-12
        err = tf.zeros(tf.shape(target)[:1])
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                feat = head(x, training=False)
                err = tf.reduce_mean(keep * tf.square(feat - target), axis=feat_axes) / energy
                loss = tf.reduce_sum(err + settings.tv * _total_variation(x) / scale_tv)
            g = tape.gradient(loss, x)
            t_count.assign_add(1.0)
            m.assign(b1 * m + (1 - b1) * g)
            v.assign(b2 * v + (1 - b2) * g * g)
            m_hat = m / (1 - tf.pow(b1, t_count))
            v_hat = v / (1 - tf.pow(b2, t_count))
            step = settings.lr * scale_tv * m_hat / (tf.sqrt(v_hat) + eps)
            x.assign(tf.clip_by_value(x - step, lo_t, hi_t))
        return tf.reduce_mean(err)

    # Each call traces its own graph (a new head); TF warns about "retracing" after five.
    tf_log = tf.get_logger()
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        return _solve(run, x, m, v, t_count, targets, in_shape, fill, settings, progress, desc)
    finally:
        tf_log.setLevel(level)


def _solve(run, x, m, v, t_count, targets, in_shape, fill, settings, progress, desc):
    import tensorflow as tf
    from tqdm.auto import tqdm

    chunk = 50  # iterations per graph call: a tqdm tick without a Python step per iteration
    out = np.empty((len(targets),) + in_shape, np.float32)
    n_batches = math.ceil(len(targets) / settings.batch_size)
    bar = tqdm(total=n_batches * settings.iters, desc=desc, unit="it", disable=not progress, leave=False)
    for start_i in range(0, len(targets), settings.batch_size):
        target = tf.constant(targets[start_i:start_i + settings.batch_size])
        shape = (int(target.shape[0]),) + in_shape
        x.assign(tf.broadcast_to(tf.constant(fill, tf.float32), shape))
        m.assign(tf.zeros(shape))
        v.assign(tf.zeros(shape))
        t_count.assign(0.0)
        done = 0
        while done < settings.iters:
            steps = min(chunk, settings.iters - done)
            err = run(target, tf.constant(steps))
            done += steps
            bar.update(steps)
            bar.set_postfix(rel_err=f"{float(err):.3g}")
        out[start_i:start_i + len(target)] = x.numpy()
    bar.close()
    return out


# ------------------------------------------------------------------- learned inversion

def build_decoder(feature_shape, image_shape, name: str = "decoder"):
    """A small decoder from a feature tensor to an image in [0, 1].

    Spatial features (H', W', C') are upsampled with stride-2 transposed convolutions
    until they reach the image size; flat features go through a dense layer to a
    quarter-size map first.  Ends in a sigmoid so pixels stay in [0, 1].
    """
    import keras
    from keras import layers

    feature_shape = tuple(int(d) for d in feature_shape)
    H, W, C = (int(d) for d in image_shape)
    inp = keras.Input(feature_shape)
    norm = layers.Normalization(axis=-1, name="feature_norm")
    h = norm(inp)
    if len(feature_shape) == 3:
        fh = feature_shape[0]
    else:
        h = layers.Flatten()(h) if len(feature_shape) > 1 else h
        fh = max(1, H // 4)
        fw = max(1, W // 4)
        h = layers.Dense(fh * fw * 32, activation="relu")(h)
        h = layers.Reshape((fh, fw, 32))(h)
    ups = max(0, int(round(math.log2(max(H / fh, 1.0)))))
    for _ in range(ups):
        h = layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(h)
    if tuple(h.shape[1:3]) != (H, W):
        h = layers.Resizing(H, W)(h)
    # 16 filters at full resolution: enough for MNIST-sized images, and half the cost of 32.
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    out = layers.Conv2D(C, 3, padding="same", activation="sigmoid")(h)
    return keras.Model(inp, out, name=name)


@dataclass
class TrainedDecoder:
    """A decoder and how its training went."""

    model: object
    epochs: int
    train_n: int
    final_loss: float

    def decode(self, features, batch_size: int = 256) -> np.ndarray:
        return np.asarray(self.model.predict(np.asarray(features, np.float32), batch_size=batch_size,
                                             verbose=0), np.float32)


def train_decoder(features, images, *, epochs: int = 5, batch_size: int = 32, lr: float = 1e-3,
                  seed: int = 0, progress: bool = False, desc: str = "decoder",
                  steps: int | None = None) -> TrainedDecoder:
    """Train a decoder (MSE, Adam) from ``features`` to ``images``: the attacker's own pairs.

    ``steps`` (when given) trains exactly that many updates over a shuffled, repeated stream
    instead of ``epochs`` passes: one Keras epoch, so a small training set trained long costs
    no per-epoch overhead.  The caller must pass images disjoint from the ones it will attack.
    """
    import keras
    from tqdm.auto import tqdm

    features = np.asarray(features, np.float32)
    images = np.asarray(images, np.float32)
    if len(features) != len(images):
        raise ValueError(f"{len(features)} feature rows but {len(images)} images")
    keras.utils.set_random_seed(seed)
    decoder = build_decoder(features.shape[1:], images.shape[1:])
    decoder.get_layer("feature_norm").adapt(features)
    decoder.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")

    bar = tqdm(total=epochs if steps is None else steps, desc=desc, unit="epoch" if steps is None else "step",
               disable=not progress, leave=False)

    class _Tick(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if steps is None:
                bar.update(1)
                bar.set_postfix(mse=f"{(logs or {}).get('loss', float('nan')):.4f}")

        def on_train_batch_end(self, batch, logs=None):
            if steps is not None and batch % 50 == 49:
                bar.update(50)

    if steps is None:
        hist = decoder.fit(features, images, epochs=epochs, batch_size=batch_size, shuffle=True,
                           verbose=0, callbacks=[_Tick()])
        done_epochs = epochs
    else:
        import tensorflow as tf

        stream = (tf.data.Dataset.from_tensor_slices((features, images))
                  .shuffle(len(features), seed=seed, reshuffle_each_iteration=True).repeat()
                  .batch(batch_size, drop_remainder=len(features) >= batch_size))
        decoder.fit(stream, epochs=1, steps_per_epoch=int(steps), shuffle=False, verbose=0, callbacks=[_Tick()])
        done_epochs = round(steps * batch_size / max(len(features), 1), 2)
        # the one epoch's "loss" is a mean over all of training: measure the end instead
        k = min(len(features), 1000)
        hist = types.SimpleNamespace(history={"loss": [float(decoder.evaluate(features[:k], images[:k], verbose=0,
                                                                              batch_size=256))]})
    bar.close()
    return TrainedDecoder(model=decoder, epochs=done_epochs, train_n=len(features),
                          final_loss=float(hist.history["loss"][-1]))
