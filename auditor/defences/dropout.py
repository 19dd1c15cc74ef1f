"""Dropout at the cut, kept on at inference (He, Zhang & Lee, ACSAC 2019 and IoT-J 2020).

Every element of the sent tensor is zeroed with probability ``rate`` on the device, fresh
for every input, and the rest scaled by ``1 / (1 - rate)``; head and tail are fine-tuned
with the same mask so the task survives it.  An attacker sees which elements are zero, but
not whether the mask or the ReLU made them so.
"""
from __future__ import annotations

from auditor.defences.base import Defence, Strength
from auditor.defences.registry import register


@register
class Dropout(Defence):
    name = "dropout"
    title = "dropout at the cut (kept on at inference)"
    reference = "He, Zhang & Lee (ACSAC 2019; IEEE IoT-J 2020)"
    strength = Strength(0.0, 1.0, "the share of the sent elements dropped", high_open=True, example=0.5)
    sweep = (0.3, 0.5, 0.7, 0.9)
    default = 0.5
    trains = ("head", "tail")

    def layer(self, cut: str):
        from converter.defended import CutDefence, layer_name

        return CutDefence(self.name, self.value, op="dropout", rate=self.value, cut=cut, name=layer_name(cut))
