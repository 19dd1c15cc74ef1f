"""White-box: the attacker has the head's weights and inverts the sent tensor (Tuor et al. eq. 1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel

WHITEBOX = ThreatModel(
    name="white-box", weights=True, architecture=True,
    knows="the head's weights (and any defence ops in it): solves x* = argmin ||b(x) - t||^2 + TV(x) "
          "by gradient descent through the head",
    reference="Tuor et al. 2018 eq. 1; Mahendran & Vedaldi 2015; settings of He, Zhang & Lee 2019")


@register
class WhiteBox(Attack):
    """Eq. 1 with a TV prior: Adam from a neutral image through the Keras head, defence ops active."""

    name = "whitebox"
    title = "white-box inversion"
    threat_model = WHITEBOX

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 32          # victims attacked (the optimisation is per image)
        iters: int = 300
        lr: float = 1e-2
        tv: float | None = None  # None: grows with the cut's depth (invert.tv_for_depth)
        start: str = "grey"      # see invert.STARTS: a black start is stuck at ReLU heads
        batch_size: int = 128

    def missing(self, head: DeployedHead, aux: AuxData) -> str | None:
        return None if head.keras_head is not None else "the head's weights are not known"

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        from auditor import invert

        s = self.settings
        tv = s.tv if s.tv is not None else invert.tv_for_depth(head.depth)
        low, high = head.input_range
        # Against a dropout at the cut the attacker who knows it matches only the entries it kept,
        # through the head without the mask (whose fresh draws would only add noise to the gradient).
        dropout = bool(head.defence) and head.defence.get("method") == "dropout" and head.clean_head is not None
        net = head.clean_head if dropout else head.keras_head
        target = np.asarray(sent, np.float32)
        if dropout:
            rate = float(head.defence.get("rate", head.defence.get("strength", 0.0)) or 0.0)
            if 0.0 < rate < 1.0 and head.defence.get("scaled", True):
                target = target * (1.0 - rate)  # inverted dropout scaled the kept entries by 1/(1 - rate)
        rec = invert.whitebox_invert(net, target, iters=s.iters, lr=s.lr, tv=tv, start=s.start,
                                     batch_size=s.batch_size, progress=progress, desc=f"white-box {head.cut}",
                                     low=low, high=high, mask_zeros=dropout)
        return Reconstruction(rec, settings={"tv": tv, "defence_aware": "dropout mask" if dropout else None},
                              notes="defence ops active in the head" if head.defence else "")
