"""Label-only baselines: what the cloud may learn anyway (the predicted class), turned into an image.

The cloud legitimately learns the class the tail predicts.  An image guessed from that class
alone is not a leak of the cut; only what an attack recovers beyond it is.  Two guesses:

* ``label_mean`` — the attacker's mean image of the predicted class (the MSE-optimal guess
  from the label, up to the attacker's data);
* ``label_decoder`` — a decoder of the same family as the query-access one, given the
  one-hot label only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel
from auditor.attacks.decoder import _from_unit, _to_unit, epochs_for

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
        min_steps: int = 300
        batch_size: int = 32
        lr: float = 1e-3

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        from auditor import invert

        s = self.settings
        pred = _predicted(head, sent)
        k = int(max(aux.y.max(), pred.max())) + 1
        onehot = np.eye(k, dtype=np.float32)
        epochs = epochs_for(len(aux), s.epochs, s.batch_size, s.min_steps)
        target = _to_unit(head, np.clip(aux.x, *head.input_range))
        dec = invert.train_decoder(onehot[aux.y], target, epochs=epochs, batch_size=s.batch_size, lr=s.lr,
                                   seed=seed, progress=progress, desc=f"label decoder {head.cut}")
        rec = _from_unit(head, dec.decode(onehot[pred]))
        return Reconstruction(rec, settings={"train_n": len(aux), "epochs": epochs,
                                             "final_train_mse": dec.final_loss})
