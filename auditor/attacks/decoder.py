"""Query access: a decoder trained on the attacker's own images sent through the deployed head."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from auditor.attacks import register
from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel

QUERY = ThreatModel(
    name="query access", queries=True, aux_data=True,
    knows="its own images and the tensors the deployed head sends for them (defence included, fresh each "
          "time): trains a decoder from sent tensor to image on those pairs",
    reference="He, Zhang & Lee 2019 (inverse network)")


def steps_for(n: int, epochs: int, batch_size: int, min_pairs: int) -> int:
    """Updates for ``n`` training pairs: ``epochs`` passes over ``max(n, min_pairs)`` pairs, so that a
    small auxiliary budget is not also an undertrained decoder (it sees its pairs more often)."""
    return int(epochs * max(1, math.ceil(max(n, min_pairs) / batch_size)))


@register
class QueryDecoder(Attack):
    """He et al.'s inverse network, over a sweep of auxiliary-data budgets (the largest is the answer)."""

    name = "decoder"
    title = "learned decoder"
    threat_model = QUERY

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 100_000
        budgets: tuple = (100, 1000, 10_000)  # auxiliary images; each capped at what the attacker has
        epochs: int = 5                        # at the largest budget
        min_pairs: int = 2000                  # a smaller budget trains as long as this many pairs would
        batch_size: int = 32
        lr: float = 1e-3

    def missing(self, head: DeployedHead, aux: AuxData) -> str | None:
        return None if len(aux) >= 2 else "the attacker has no images of its own"

    def reconstruct(self, head, sent, aux, *, seed=0, progress=False) -> Reconstruction:
        from auditor import invert

        s = self.settings
        budgets = sorted({min(int(b), len(aux)) for b in s.budgets if int(b) >= 2} or {len(aux)})
        sweep, info = {}, {}
        rec = None
        # The attacker's queries, once for the largest budget (each image its own fresh noise when
        # hardened); a smaller budget is a prefix of the same pairs.
        queried = head.send(aux.x[:budgets[-1]])
        for b in budgets:
            own = aux.take(b)
            feats = queried[:b]
            pixels_in = np.clip(own.x, *head.input_range)
            steps = steps_for(b, s.epochs, s.batch_size, s.min_pairs)
            dec = invert.train_decoder(feats, _to_unit(head, pixels_in), batch_size=s.batch_size, lr=s.lr,
                                       seed=seed, progress=progress, desc=f"decoder {head.cut} n={b}", steps=steps)
            rec = _from_unit(head, dec.decode(sent))
            sweep[str(b)] = rec
            info[str(b)] = {"steps": steps, "epochs": dec.epochs, "final_train_mse": dec.final_loss}
        return Reconstruction(rec, settings={"budgets": budgets, "train_n": budgets[-1], "per_budget": info,
                                             "train_images": "the attacker's own (disjoint from the victims)"},
                              sweep=sweep if len(sweep) > 1 else {})


def _to_unit(head: DeployedHead, x) -> np.ndarray:
    """Model input -> [0, 1] (the decoder ends in a sigmoid)."""
    low, high = head.input_range
    return (np.asarray(x, np.float32) - low) / np.maximum(high - low, 1e-12)


def _from_unit(head: DeployedHead, u) -> np.ndarray:
    low, high = head.input_range
    return (np.asarray(u, np.float32) * (high - low) + low).astype(np.float32)
