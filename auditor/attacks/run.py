"""Run attacks on one deployed head and score them the same way, beside the label-only baseline."""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from auditor.attacks.base import Attack, AuxData, DeployedHead

log = logging.getLogger(__name__)

#: reconstructions kept per attack for the report's grid
GRID_N = 8


@dataclass
class AttackOutcome:
    """One attack (or baseline) on one head: its scores, settings and threat model."""

    name: str
    title: str
    threat_model: dict
    baseline: bool
    settings: dict
    n: int                                  # victims attacked (the first n rows)
    metrics: dict                           # psnr_db, psnr_db_std, ssim, mse (pixel space) [+ accuracy, judge_accuracy]
    sweep: dict = field(default_factory=dict)        # label -> metrics of the same attack under other settings
    seconds: float = 0.0
    notes: str = ""
    skipped: str | None = None              # why it did not run
    beyond_label: dict | None = None        # this attack minus the label-only baseline on the same victims
    psnr: np.ndarray | None = field(default=None, repr=False)   # per image
    ssim: np.ndarray | None = field(default=None, repr=False)
    images: np.ndarray | None = field(default=None, repr=False)  # the first GRID_N reconstructions, pixels [0, 1]
    raw: np.ndarray | None = field(default=None, repr=False)     # all reconstructions, model input space

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "threat_model": self.threat_model,
                "baseline": self.baseline, "settings": self.settings, "n": self.n, "metrics": self.metrics,
                "sweep": self.sweep, "seconds": self.seconds, "notes": self.notes, "skipped": self.skipped,
                "beyond_label": self.beyond_label}


@dataclass
class AttackReport:
    """Every attack and baseline run on one head."""

    head: dict
    outcomes: list
    n_victims: int
    seconds: float = 0.0

    def get(self, name: str) -> AttackOutcome:
        for o in self.outcomes:
            if o.name == name:
                return o
        raise KeyError(name)

    def attacks(self) -> list:
        return [o for o in self.outcomes if not o.baseline and o.skipped is None]

    def baselines(self) -> list:
        return [o for o in self.outcomes if o.baseline and o.skipped is None]

    def strongest(self, metric: str = "psnr_db") -> AttackOutcome | None:
        """The attack (not a baseline) with the highest ``metric``; None when none ran."""
        ran = self.attacks()
        return max(ran, key=lambda o: o.metrics[metric]) if ran else None

    def label_baseline(self) -> AttackOutcome | None:
        """The stronger label-only baseline (highest PSNR over all victims)."""
        ran = self.baselines()
        return max(ran, key=lambda o: o.metrics["psnr_db"]) if ran else None

    def beyond_label(self) -> dict:
        """The strongest attack against the label-only baseline on the same victims (dB and SSIM)."""
        top = self.strongest()
        if top is None:
            return {"attack": None, "psnr_db": None, "label_psnr_db": None, "gap_db": None, "ssim": None,
                    "label_ssim": None, "gap_ssim": None, "baseline": None}
        b = top.beyond_label or {}
        return {"attack": top.name, "threat_model": top.threat_model["name"], "psnr_db": top.metrics["psnr_db"],
                "ssim": top.metrics["ssim"], "baseline": b.get("baseline"), "label_psnr_db": b.get("label_psnr_db"),
                "label_ssim": b.get("label_ssim"), "gap_db": b.get("gap_db"), "gap_ssim": b.get("gap_ssim")}

    def to_dict(self) -> dict:
        return {"head": self.head, "n_victims": self.n_victims, "seconds": self.seconds,
                "attacks": {o.name: o.to_dict() for o in self.outcomes}, "beyond_label": self.beyond_label()}


def _seed_for(seed: int, name: str) -> int:
    return int(seed) + zlib.crc32(name.encode()) % 10_000


def score(head: DeployedHead, x_true, reconstruction, *, model=None, labels=None, judge=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, per-image PSNR, per-image SSIM) of ``reconstruction`` against ``x_true``, in pixel space.

    ``model`` / ``judge`` read the reconstructions (model input space) against ``labels``:
    ``accuracy`` is the audited model's, ``judge_accuracy`` an independent reader's.
    """
    from auditor import metrics as m

    a, b = head.to_pixels(x_true), head.to_pixels(reconstruction)
    p, s = m.psnr(a, b), m.ssim(a, b)
    out = {"n": int(len(p)), "mse": float(m.mse(a, b).mean()), "psnr_db": float(p.mean()),
           "psnr_db_std": float(p.std()), "ssim": float(s.mean()), "accuracy": None, "agreement": None,
           "judge_accuracy": None}
    truth = None if labels is None else np.asarray(labels).reshape(-1)[:len(p)]
    if model is not None:
        seen = m.predict_labels(model, reconstruction)
        if truth is not None:
            out["accuracy"] = float((seen == truth).mean())
        out["agreement"] = float((seen == m.predict_labels(model, x_true)).mean())
    if judge is not None and truth is not None:
        out["judge_accuracy"] = float((m.predict_labels(judge, reconstruction) == truth).mean())
    return out, p, s


def run_attacks(head: DeployedHead, x_victims, aux: AuxData, *, attacks=None, settings: dict | None = None,
                labels=None, model=None, judge=None, seed: int = 0, progress: bool = False,
                sent=None) -> "AttackReport":
    """Run ``attacks`` (registry names or :class:`Attack` objects; default all four and both baselines)
    on ``head``: the victims ``x_victims`` are sent once through ``head.send`` (or ``sent`` is given:
    what was observed on the wire), every attack reconstructs from those tensors, and each is scored
    in pixel space against the victims and against the label-only baseline on the same rows.

    ``settings`` maps a registry name to its keyword settings.  ``labels`` are the victims' true
    classes (for the readers ``model`` and ``judge``).  An attack that cannot run on this head
    (e.g. no weights known) is kept with ``skipped`` saying why.
    """
    from auditor.attacks import registry

    t0 = time.perf_counter()
    x_victims = np.asarray(x_victims, np.float32)
    settings = settings or {}
    chosen = list(attacks) if attacks is not None else list(registry.ATTACKS) + list(registry.BASELINES)
    objs = []
    for a in chosen:
        if isinstance(a, Attack):
            objs.append(a)
        else:
            objs.append(registry.get(a, **settings.get(a, {})))
    unknown = set(settings) - {o.name for o in objs}
    if unknown:
        raise ValueError(f"settings given for attacks that are not run: {', '.join(sorted(unknown))}")
    if sent is None:
        sent = head.send(x_victims)
    sent = np.asarray(sent, np.float32)
    if len(sent) != len(x_victims):
        raise ValueError(f"{len(sent)} sent tensors for {len(x_victims)} victims")

    outcomes = []
    # Baselines first: every attack is then also scored beyond them.
    for atk in sorted(objs, key=lambda o: not o.baseline):
        tm = atk.threat_model.to_dict()
        why = atk.missing(head, aux)
        if why:
            log.info("%s skipped at %s: %s", atk.name, head.cut, why)
            outcomes.append(AttackOutcome(name=atk.name, title=atk.title, threat_model=tm, baseline=atk.baseline,
                                          settings=atk.settings_dict(), n=0, metrics={}, skipped=why))
            continue
        n = min(len(x_victims), getattr(atk.settings, "max_n", len(x_victims)))
        t = time.perf_counter()
        rec = atk.reconstruct(head, sent[:n], aux, seed=_seed_for(seed, atk.name), progress=progress)
        seconds = time.perf_counter() - t
        images = np.asarray(rec.images, np.float32)
        if images.shape != x_victims[:n].shape:
            raise ValueError(f"attack {atk.name} returned images of shape {images.shape}, "
                             f"expected {x_victims[:n].shape}")
        metrics, p, s = score(head, x_victims[:n], images, model=model, labels=labels, judge=judge)
        sweep = {}
        for key, imgs in rec.sweep.items():
            sweep[str(key)] = score(head, x_victims[:n], imgs)[0]
        outcomes.append(AttackOutcome(name=atk.name, title=atk.title, threat_model=tm, baseline=atk.baseline,
                                      settings=dict(atk.settings_dict(), **rec.settings), n=n, metrics=metrics,
                                      sweep=sweep, seconds=seconds, notes=rec.notes, psnr=p, ssim=s,
                                      images=head.to_pixels(images[:GRID_N]), raw=images))
        log.info("%s at %s (%s): %.1f dB, SSIM %.3f, %.1f s", atk.name, head.cut, head.name, metrics["psnr_db"],
                 metrics["ssim"], seconds)

    baselines = [o for o in outcomes if o.baseline and o.skipped is None]
    for o in outcomes:
        if o.baseline or o.skipped is not None or not baselines:
            continue
        # the stronger baseline on exactly this attack's victims
        best = max(baselines, key=lambda b: float(b.psnr[:o.n].mean()))
        lp, ls = float(best.psnr[:o.n].mean()), float(best.ssim[:o.n].mean())
        o.beyond_label = {"baseline": best.name, "label_psnr_db": lp, "label_ssim": ls,
                          "gap_db": o.metrics["psnr_db"] - lp, "gap_ssim": o.metrics["ssim"] - ls}
    order = {name: i for i, name in enumerate(list(registry.ATTACKS) + list(registry.BASELINES))}
    outcomes.sort(key=lambda o: order.get(o.name, len(order)))
    return AttackReport(head=head.describe(), outcomes=outcomes, n_victims=len(x_victims),
                        seconds=time.perf_counter() - t0)
