"""Noise at the cut: Gaussian or Laplace, of a given scale or a learned one (Shredder).

The device adds the noise to every input; the tail is fine-tuned to read through it.  The
head stays frozen: a head trained against a fixed noise would simply scale its features up
and outgrow it.  The strength is the noise's standard deviation in units of the clean
features' root mean square (measured once on training images), so it means the same at
every cut and for every model.

Learned (``learned=True``, after Mireshghallah et al., Shredder, ASPLOS 2020): one noise
scale per element is trained with the tail, rewarded for growing (``- reward * mean log
scale``) and held back only by the cross-entropy, so noise piles up where the task does not
need the channel.
"""
from __future__ import annotations

from auditor.defences.base import Defence, Strength
from auditor.defences.registry import register

#: Shredder's reward for larger noise (per nat of mean log scale)
SHREDDER_REWARD = 0.05


@register
class Noise(Defence):
    name = "noise"
    title = "noise at the cut"
    reference = "additive noise; learned per element as Shredder (Mireshghallah et al., ASPLOS 2020)"
    strength = Strength(0.0, 20.0, "the noise's standard deviation in units of the clean features' RMS",
                        example=1.0)
    sweep = (0.5, 1.0, 2.0, 4.0)
    default = 1.0
    trains = ("tail",)

    def __init__(self, value, *, reference, distribution: str = "gaussian", learned: bool = False, **options):
        super().__init__(value, reference=reference, **options)
        self.distribution = distribution
        self.learned = bool(learned)
        if self.learned:
            self.trains = ("tail", "defence")

    def layer(self, cut: str):
        from converter.defended import CutDefence, layer_name

        return CutDefence(self.name, self.value, op="noise", distribution=self.distribution,
                          scale=self.value * self.ref.rms, learned=self.learned, cut=cut, name=layer_name(cut))

    def penalty(self, batch):
        if not self.learned:
            return None
        import keras

        return -SHREDDER_REWARD * keras.ops.mean(batch.layer.log_scale)

    def describe(self) -> str:
        how = "learned per element from" if self.learned else "std"
        return f"{self.distribution} noise, {how} {self.value:g} x feature RMS ({self.value * self.ref.rms:.4g})"
