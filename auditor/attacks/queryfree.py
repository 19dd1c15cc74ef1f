"""Query-free: the attacker runs the tail (the cloud does) and has its own labelled images.

He, Zhang & Lee (ACSAC 2019, "query-free attack") train a *shadow head* b' so that the real
tail reads it right — tail(b'(x)) predicts the attacker's labels, the tail frozen — and then
invert the shadow white-box on the observed tensor.  The shadow has the head's layers (and its
defence ops), fresh weights; it never queries the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel

log = logging.getLogger(__name__)

QUERY_FREE = ThreatModel(
    name="query-free", architecture=True, tail=True, aux_data=True,
    knows="the tail (the cloud runs it) and its own labelled images, no queries to the device: trains a "
          "shadow head the tail reads correctly, then inverts the shadow white-box",
    reference="He, Zhang & Lee 2019 (query-free attack)")


@register
class QueryFree(Attack):
    """Shadow head trained through the frozen tail, then eq. 1 on the shadow."""

    name = "queryfree"
    title = "shadow-head inversion (query-free)"
    threat_model = QUERY_FREE

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 32
        train_n: int = 10_000     # auxiliary images for the shadow (capped at what the attacker has)
        epochs: int = 3
        batch_size: int = 64
        lr: float = 1e-3
        iters: int = 300          # white-box on the shadow
        lr_invert: float = 1e-2
        tv: float | None = None

    def missing(self, head: DeployedHead, aux: AuxData) -> str | None:
        if head.keras_tail is None:
            return "the tail is not known"
        if head.architecture is None:
            return "the head's architecture is not known"
        return None if len(aux) >= 10 else "the attacker has fewer than 10 labelled images"

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        from auditor import invert

        s = self.settings
        shadow, info = train_shadow(head, aux.take(s.train_n), epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                                    seed=seed)
        tv = s.tv if s.tv is not None else invert.tv_for_depth(head.depth)
        low, high = head.input_range
        rec = invert.whitebox_invert(shadow, sent, iters=s.iters, lr=s.lr_invert, tv=tv, progress=progress,
                                     desc=f"query-free {head.cut}", low=low, high=high)
        return Reconstruction(rec, settings=dict(info, tv=tv))


def _outputs_probabilities(outputs) -> bool:
    """Whether the model ends in probabilities (softmax) rather than logits, from outputs of it."""
    out = np.asarray(outputs)
    return bool(out.min() >= 0 and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3))


def train_shadow(head: DeployedHead, aux: AuxData, *, epochs: int, batch_size: int, lr: float, seed: int):
    """(shadow head, info): ``head.architecture()`` trained so that the frozen tail predicts ``aux.y``."""
    import keras

    keras.utils.set_random_seed(seed)
    shadow = head.architecture()
    tail = head.keras_tail
    was = tail.trainable
    tail.trainable = False
    try:
        # the untrained shadow through the tail: a softmax anywhere after the cut still sums to 1
        probs = _outputs_probabilities(tail(shadow(aux.x[:16], training=False), training=False))
        inp = keras.Input(head.input_shape)
        joined = keras.Model(inp, tail(shadow(inp)), name="shadow_and_tail")
        joined.compile(optimizer=keras.optimizers.Adam(lr),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probs),
                       metrics=["accuracy"])
        hist = joined.fit(aux.x, aux.y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    finally:
        tail.trainable = was
    info = {"train_n": len(aux), "epochs": epochs, "shadow_train_accuracy": float(hist.history["accuracy"][-1]),
            "tail_outputs": "probabilities" if probs else "logits"}
    return shadow, info
