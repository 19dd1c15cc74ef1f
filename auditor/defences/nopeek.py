"""NoPeek (Vepakomma et al., 2020): fine-tune with a distance-correlation penalty.

The loss adds ``strength * dCor(x, f)``, the sample distance correlation between the batch's
images and their sent features (Szekely's V-statistic, as ``auditor.usable.distance_correlation``
computes it, here in TensorFlow so that it has a gradient).  Nothing runs on the device: the
head's weights are the defence.
"""
from __future__ import annotations

from auditor.defences.base import Defence, Strength
from auditor.defences.registry import register


def distance_correlation(a, b, eps: float = 1e-9):
    """dCor of two batches (rows paired), differentiable; in [0, 1]."""
    import keras

    ops = keras.ops

    def centred(m):
        m = ops.reshape(m, (ops.shape(m)[0], -1))
        sq = ops.sum(m * m, axis=1)
        d = ops.sqrt(ops.maximum(sq[:, None] + sq[None, :] - 2.0 * ops.matmul(m, ops.transpose(m)), 0.0) + eps)
        return d - ops.mean(d, axis=0, keepdims=True) - ops.mean(d, axis=1, keepdims=True) + ops.mean(d)

    ca, cb = centred(a), centred(b)
    dcov = ops.mean(ca * cb)
    var = ops.sqrt(ops.mean(ca * ca) * ops.mean(cb * cb)) + eps
    return ops.sqrt(ops.maximum(dcov / var, 0.0) + eps)


@register
class NoPeek(Defence):
    name = "nopeek"
    title = "NoPeek (distance-correlation penalty)"
    reference = "Vepakomma, Singh, Gupta & Raskar, NoPeek (ICDM Workshops 2020)"
    strength = Strength(0.0, 100.0, "the weight of the distance correlation in the loss", example=1.0)
    sweep = (0.5, 1.0, 2.0, 4.0)
    default = 1.0
    trains = ("head", "tail")

    def penalty(self, batch):
        return self.value * distance_correlation(batch.x, batch.sent)
