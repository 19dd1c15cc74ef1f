"""Label-only baselines: what the cloud may learn anyway (the predicted class), turned into an image.

The cloud legitimately learns the class the tail predicts.  An image guessed from that class
alone is not a leak of the cut; only what an attack recovers beyond it is.  Two guesses:

* ``label_mean`` — the attacker's mean image of the predicted class (the MSE-optimal guess
  from the label, up to the attacker's data);
* ``label_decoder`` — a learned decoder given the one-hot label only (two dense layers: with
  one input per class no convolution could do better, and it trains in seconds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel
from auditor.attacks.decoder import _from_unit, _to_unit, steps_for

LABEL_ONLY = ThreatModel(
    name="label only", aux_data=True, label=True,
    knows="only the class the cloud predicts from the sent tensor, and its own labelled images",
    reference="baseline: leakage is what a reconstruction holds beyond the label")


def _predicted(head: DeployedHead, sent) -> np.ndarray:
    return head.predicted_labels(sent)


class _LabelBaseline(Attack):
    baseline = True
    threat_model = LABEL_ONLY

    def missing(self, head: DeployedHead, aux: AuxData) -> str | None:
        if head.tail is None:
            return "no tail to read the predicted class with"
        return None if len(aux) else "the attacker has no images of its own"


@register
class LabelMean(_LabelBaseline):
    """The attacker's mean image of the predicted class."""

    name = "label_mean"
    title = "mean image of the predicted class"

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 100_000

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        pred = _predicted(head, sent)
        overall = aux.x.mean(axis=0)
        means = {int(c): aux.x[aux.y == c].mean(axis=0) for c in np.unique(aux.y)}
        rec = np.stack([means.get(int(c), overall) for c in pred]).astype(np.float32)
        return Reconstruction(rec, settings={"train_n": len(aux), "classes_seen": len(means)})


@register
class LabelDecoder(_LabelBaseline):
    """A decoder from the one-hot predicted class to an image, trained on the attacker's labelled images."""

    name = "label_decoder"
    title = "decoder given only the label"

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 100_000
        epochs: int = 3
        min_pairs: int = 2000
        batch_size: int = 32
        lr: float = 1e-3

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        import keras

        s = self.settings
        pred = _predicted(head, sent)
        k = int(max(aux.y.max(), pred.max())) + 1
        onehot = np.eye(k, dtype=np.float32)
        steps = steps_for(len(aux), s.epochs, s.batch_size, s.min_pairs)
        target = _to_unit(head, np.clip(aux.x, *head.input_range))
        keras.utils.set_random_seed(seed)
        shape = target.shape[1:]
        dec = keras.Sequential([keras.Input((k,)), keras.layers.Dense(256, activation="relu"),
                                keras.layers.Dense(int(np.prod(shape)), activation="sigmoid"),
                                keras.layers.Reshape(shape)], name="label_decoder")
        dec.compile(optimizer=keras.optimizers.Adam(s.lr), loss="mse")
        epochs = max(1, round(steps * s.batch_size / len(aux)))
        hist = dec.fit(onehot[aux.y], target, epochs=epochs, batch_size=s.batch_size, shuffle=True, verbose=0)
        rec = _from_unit(head, dec.predict(onehot[pred], batch_size=512, verbose=0))
        return Reconstruction(rec, settings={"train_n": len(aux), "epochs": epochs,
                                             "final_train_mse": float(hist.history["loss"][-1]),
                                             "decoder": f"dense {k}-256-{int(np.prod(shape))}"})
