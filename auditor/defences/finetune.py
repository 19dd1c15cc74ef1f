"""Fine-tune a trained model with a defence at one cut: the loop every method shares.

:func:`harden_model` clones the model, puts the method's ``CutDefence`` layer after the cut
(``converter.defended.insert_defence``), and trains for a fixed number of steps with Adam
(cosine-decayed) on cross-entropy plus the method's penalty, updating only the weights the
method names (head, tail, the defence layer's own).  Layers run in inference mode
(``training=False``: batch-norm statistics stay as trained, as when fine-tuning any
pretrained network); the defence layer is active regardless, so the model trains under the
same noise or mask the device will draw.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from auditor.defences.base import Batch, Defence, Reference
from protocol.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """How long and how hard to fine-tune."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3              # peak of the cosine-decayed Adam learning rate
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"--steps must be a whole number >= 1, got {self.steps!r}", fix="e.g. --steps 400")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise UsageError(f"--batch-size must be >= 2, got {self.batch_size!r}", fix="e.g. --batch-size 128")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise UsageError(f"--lr must be in (0, 1), got {self.lr!r}", fix="e.g. --lr 1e-3")


@dataclass
class Hardened:
    """A model fine-tuned with a defence at ``cut``."""

    model: object                 # keras.Model with the CutDefence layer after the cut
    cut: str
    method: str
    strength: float
    defence: object               # the Defence object that trained it
    layer: object                 # its CutDefence layer
    reference: Reference
    history: list = field(default_factory=list)   # [{"step", "loss", "ce", "penalty", "accuracy"}]
    seconds: float = 0.0

    @property
    def spec(self):
        """The manifest's declaration (without the head's quantization, which the bundle adds)."""
        return self.layer.spec()


def output_is_logits(model) -> bool:
    last = model.layers[-1]
    act = getattr(last, "activation", None)
    return not (type(last).__name__ == "Softmax" or getattr(act, "__name__", "") == "softmax")


def reference_for(model, cut: str, x, y) -> Reference:
    """The clean features' RMS at ``cut`` and the label-only squared error, on images ``x``."""
    import keras

    from converter.split import cut_tensor

    head = keras.Model(model.inputs[0], cut_tensor(model, cut))
    f = np.asarray(head.predict(np.asarray(x, np.float32), batch_size=250, verbose=0), np.float64)
    rms = float(np.sqrt(np.mean(f * f)))
    y = np.asarray(y).reshape(-1)
    xs = np.asarray(x, np.float64)
    means = {k: xs[y == k].mean(axis=0) for k in np.unique(y)}
    guess = np.stack([means[k] for k in y])
    return Reference(rms=rms if rms > 0 else 1.0, channels=int(f.shape[-1]), feature_shape=tuple(f.shape[1:]),
                     input_shape=tuple(xs.shape[1:]), label_mse=float(np.mean((xs - guess) ** 2)))


def harden_model(model, cut: str, method: str, strength: float, x_train, y_train, *,
                 settings: FinetuneSettings = FinetuneSettings(), options: dict | None = None,
                 progress: bool = False) -> Hardened:
    """Fine-tune a copy of ``model`` with ``method`` at ``cut`` (the original is not touched)."""
    import keras
    import tensorflow as tf
    from tqdm.auto import tqdm

    from auditor.defences.registry import get
    from converter.defended import insert_defence
    from converter.split import cut_tensor

    t0 = time.perf_counter()
    cls = get(method)
    cls.strength.check(method, strength)
    keras.utils.set_random_seed(settings.seed)
    x_train = np.asarray(x_train, np.float32)
    y_train = np.asarray(y_train).reshape(-1).astype(np.int64)
    ref_n = min(len(x_train), 2000)
    ref = reference_for(model, cut, x_train[:ref_n], y_train[:ref_n])
    defence = cls(strength, reference=ref, **(options or {}))

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = defence.layer(cut)
    hardened = insert_defence(clone, cut, layer, name=model.name)
    clean = cut_tensor(hardened, cut)
    multi = keras.Model(hardened.inputs[0], [clean, layer.output, hardened.outputs[0]])
    head_model = keras.Model(hardened.inputs[0], clean)

    head_ids = {id(v) for v in head_model.trainable_variables}
    defence_ids = {id(v) for v in layer.trainable_variables}
    groups = {"head": [v for v in hardened.trainable_variables if id(v) in head_ids],
              "defence": [v for v in hardened.trainable_variables if id(v) in defence_ids],
              "tail": [v for v in hardened.trainable_variables if id(v) not in head_ids | defence_ids]}
    variables = [v for g in defence.trains if g != "defence" for v in groups[g]]
    own = groups["defence"] if "defence" in defence.trains else []
    for g in defence.trains:
        if g != "defence" and not groups[g]:
            raise UsageError(f"{method} at {cut!r} trains the {g}, which has no trainable weights there",
                             fix=f"harden a cut with trainable layers on the {g}'s side "
                                 f"(see `edgesplit cuts MODEL`)")
    defence.prepare(np.asarray(head_model.predict(x_train[:ref_n], batch_size=250, verbose=0)))

    from_logits = output_is_logits(model)
    schedule = keras.optimizers.schedules.CosineDecay(settings.lr, decay_steps=settings.steps)
    opt = keras.optimizers.Adam(schedule)
    opt_own = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        settings.lr * defence.defence_lr_factor, decay_steps=settings.steps))
    total = float(settings.steps)

    @tf.function(reduce_retracing=True)
    def step(x, y, i):
        with tf.GradientTape() as tape:
            f, z, out = multi(x, training=False)
            ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out, from_logits=from_logits))
            extra = defence.penalty(Batch(x=x, y=y, clean=f, sent=z, output=out, layer=layer, progress=i / total))
            extra = tf.constant(0.0) if extra is None else extra
            loss = ce + extra
        grads = tape.gradient(loss, variables + own)
        opt.apply_gradients(zip(grads[:len(variables)], variables))
        if own:
            opt_own.apply_gradients(zip(grads[len(variables):], own))
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out, -1), y), tf.float32))
        return loss, ce, extra, acc

    sent_of = keras.Model(hardened.inputs[0], layer.output)
    needs_sent = type(defence).before_step is not Defence.before_step
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(x_train))
    pos, history, window = 0, [], []
    bar = tqdm(total=settings.steps, desc=f"harden {method} {strength:g}", unit="step",
               disable=None if progress else True, leave=False)
    for i in range(settings.steps):
        if pos + settings.batch_size > len(order):
            order, pos = rng.permutation(len(x_train)), 0
        idx = order[pos:pos + settings.batch_size]
        pos += settings.batch_size
        xb, yb = tf.constant(x_train[idx]), tf.constant(y_train[idx])
        if needs_sent:
            defence.before_step(xb, sent_of(xb, training=False))
        loss, ce, extra, acc = step(xb, yb, tf.constant(float(i)))
        window.append((float(loss), float(ce), float(extra), float(acc)))
        if len(window) == 50 or i == settings.steps - 1:
            m = np.mean(window, axis=0)
            history.append({"step": i + 1, "loss": m[0], "ce": m[1], "penalty": m[2], "accuracy": m[3]})
            bar.set_postfix(ce=f"{m[1]:.3f}", acc=f"{m[3]:.3f}")
            window = []
        if not math.isfinite(float(loss)):
            raise UsageError(f"fine-tuning {method} {strength:g} at {cut!r} diverged (loss {float(loss)})",
                             fix="use a smaller --strength or a lower --lr")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    log.info("hardened %s at %s with %s %g: %d steps in %.1f s, last ce %.4f", model.name, cut, method, strength,
             settings.steps, seconds, history[-1]["ce"] if history else float("nan"))
    return Hardened(model=hardened, cut=cut, method=method, strength=float(strength), defence=defence, layer=layer,
                    reference=ref, history=history, seconds=seconds)
