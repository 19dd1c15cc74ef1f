"""White-box: the attacker has the head's weights and inverts the sent tensor (Tuor et al. eq. 1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel

WHITEBOX = ThreatModel(
    name="white-box", weights=True, architecture=True,
    knows="the head's weights (and any defence in it): solves x* = argmin ||b(x) - t||^2 + TV(x) "
          "by gradient descent through the head",
    reference="Tuor et al. 2018 eq. 1; Mahendran & Vedaldi 2015; settings of He, Zhang & Lee 2019")


def defence_model(head: DeployedHead) -> tuple[object, np.ndarray, dict]:
    """(network, target transform, invert options) of an attacker who knows the declared defence.

    Against a dropout at the cut it matches only the entries the mask kept, through the head
    without the mask (un-doing inverted dropout's 1/(1 - rate)); against noise it weighs each
    channel by 1/scale^2 through the clean head (the Gaussian likelihood).  Otherwise — no defence,
    or one it has no model of — it descends through the head as deployed, defence ops active, so
    that the noise is averaged over the steps (expectation over transformation).
    """
    d = head.defence or {}
    op = d.get("op", d.get("method"))
    clean = head.clean_head
    if clean is None or op in (None, "none"):
        return head.keras_head, (lambda t: t), {"defence_aware": None}
    if op == "dropout":
        rate = float(d.get("rate", d.get("strength", 0.0)) or 0.0)
        factor = (1.0 - rate) if 0.0 < rate < 1.0 and d.get("scaled", True) else 1.0
        return clean, (lambda t: t * factor), {"mask_zeros": True, "defence_aware": "dropout: kept entries only"}
    if op == "noise" and d.get("scale") is not None:
        scale = np.maximum(np.asarray(d["scale"], np.float32), 1e-6)
        return clean, (lambda t: t), {"weight": 1.0 / scale ** 2, "defence_aware": "noise: 1/scale^2 per channel"}
    return head.keras_head, (lambda t: t), {"defence_aware": "expectation over the defence's draws"}


@register
class WhiteBox(Attack):
    """Eq. 1 with a TV prior: Adam from a neutral image through the Keras head, adaptive to the defence."""

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
        net, transform, opts = defence_model(head)
        aware = opts.pop("defence_aware")
        rec = invert.whitebox_invert(net, transform(np.asarray(sent, np.float32)), iters=s.iters, lr=s.lr, tv=tv,
                                     start=s.start, batch_size=s.batch_size, progress=progress,
                                     desc=f"white-box {head.cut}", low=low, high=high, **opts)
        return Reconstruction(rec, settings={"tv": tv, "defence_aware": aware})
