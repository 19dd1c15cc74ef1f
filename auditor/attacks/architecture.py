"""Architecture only: the attacker knows the head's layers but not their weights (UnSplit).

Erdogan, Küpçü & Çiçek (UnSplit, WPES 2022) invert a split model whose client half is unknown
by optimising the input and a surrogate of the head together: both minimise
||b'(x) - t||^2 (+ a TV prior on x), alternating steps on the images and on the surrogate's
weights.  Here one surrogate is shared by all attacked rows, which constrains it more than one
image could.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel

log = logging.getLogger(__name__)

ARCHITECTURE = ThreatModel(
    name="architecture only", architecture=True,
    knows="the head's layers (and defence ops) but not their weights: optimises the input and a surrogate "
          "head together until the surrogate sends what was observed",
    reference="Erdogan, Kupcu & Cicek, UnSplit (WPES 2022)")


@register
class ArchitectureOnly(Attack):
    """UnSplit: joint Adam on the images and a freshly initialised copy of the head."""

    name = "architecture"
    title = "architecture-only inversion (UnSplit)"
    threat_model = ARCHITECTURE

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 32
        rounds: int = 100        # alternations
        x_steps: int = 3         # image steps per round
        w_steps: int = 3         # surrogate steps per round
        lr: float = 1e-2         # image step
        lr_weights: float = 1e-3
        tv: float | None = None  # None: grows with depth, as the white-box attack's
        restarts: int = 1        # fresh surrogates; the one that explains t best is kept

    def missing(self, head: DeployedHead, aux: AuxData) -> str | None:
        return None if head.architecture is not None else "the head's architecture is not known"

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        import keras

        from auditor import invert

        s = self.settings
        tv = s.tv if s.tv is not None else invert.tv_for_depth(head.depth)
        best, best_err = None, np.inf
        for r in range(s.restarts):
            keras.utils.set_random_seed(seed + r)
            surrogate = head.architecture()
            rec, err = joint_invert(surrogate, sent, head.input_range, rounds=s.rounds, x_steps=s.x_steps,
                                    w_steps=s.w_steps, lr=s.lr, lr_weights=s.lr_weights, tv=tv,
                                    progress=progress, desc=f"UnSplit {head.cut}")
            if err < best_err:
                best, best_err = rec, err
        return Reconstruction(best, settings={"tv": tv, "final_relative_error": float(best_err)})


def joint_invert(surrogate, targets, input_range, *, rounds: int, x_steps: int, w_steps: int, lr: float,
                 lr_weights: float, tv: float, progress: bool = False, desc: str = "UnSplit"):
    """(images, final relative feature error): alternate Adam steps on x (clipped to the input range)
    and on ``surrogate``'s weights, both minimising ||b'(x) - t||^2 / ||t||^2 + tv * TV(x)."""
    import keras
    import tensorflow as tf
    from tqdm.auto import tqdm

    from auditor.invert import _total_variation

    low, high = (np.broadcast_to(np.asarray(v, np.float32), surrogate.input_shape[-1:]) for v in input_range)
    targets = np.asarray(targets, np.float32)
    in_shape = tuple(int(d) for d in surrogate.input_shape[1:])
    out_shape = tuple(int(d) for d in surrogate.output_shape[1:])
    targets = targets.reshape((len(targets),) + out_shape)
    axes = list(range(1, 1 + len(out_shape)))
    span = float(np.mean(high - low)) or 1.0
    t = tf.constant(targets)
    energy = tf.reduce_mean(t * t, axis=axes) + 1e-12
    x = tf.Variable(tf.broadcast_to(tf.constant((low + high) / 2), (len(targets),) + in_shape))
    opt_x = keras.optimizers.Adam(lr * span)
    opt_w = keras.optimizers.Adam(lr_weights)
    weights = surrogate.trainable_variables
    lo_t, hi_t = tf.constant(low), tf.constant(high)

    def loss_fn():
        err = tf.reduce_mean(tf.square(surrogate(x, training=False) - t), axis=axes) / energy
        return tf.reduce_mean(err) + tv * tf.reduce_mean(_total_variation(x)) / span, tf.reduce_mean(err)

    @tf.function
    def step_x():
        with tf.GradientTape() as tape:
            loss, err = loss_fn()
        opt_x.apply_gradients([(tape.gradient(loss, x), x)])
        x.assign(tf.clip_by_value(x, lo_t, hi_t))
        return err

    @tf.function
    def step_w():
        with tf.GradientTape() as tape:
            loss, err = loss_fn()
        opt_w.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return err

    err = np.inf
    bar = tqdm(total=rounds, desc=desc, unit="round", disable=not progress, leave=False)
    for _ in range(rounds):
        for _ in range(x_steps):
            err = step_x()
        for _ in range(w_steps):
            err = step_w()
        bar.update(1)
    bar.close()
    return x.numpy().astype(np.float32), float(loss_fn()[1])
