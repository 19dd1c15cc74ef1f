"""The audit's use of the attacks: one call per cut (or hardened cut), its settings and its report entries."""
from __future__ import annotations

import logging

import numpy as np

from auditor.attacks.base import AuxData, DeployedHead

log = logging.getLogger(__name__)

#: What the audit says the white-box attack targets (kept in report.json since the first schema).
TARGET = "int8 features as sent, dequantized"


def attack_settings(spec, attack_n: int) -> dict:
    """Registry settings from an ``AuditSpec``: its white-box knobs drive the three optimisation attacks."""
    rounds = max(1, spec.iters // 3)  # UnSplit: 3 image steps + 3 surrogate steps per round
    return {
        "whitebox": {"max_n": attack_n, "iters": spec.iters, "lr": spec.lr, "tv": spec.tv, "start": spec.start},
        "decoder": {"budgets": tuple(spec.aux_budgets), "epochs": spec.decoder_epochs},
        "architecture": {"max_n": attack_n, "rounds": rounds, "lr": spec.lr, "tv": spec.tv},
        "queryfree": {"max_n": attack_n, "train_n": spec.decoder_n, "epochs": spec.decoder_epochs,
                      "iters": spec.iters, "lr_invert": spec.lr, "tv": spec.tv},
        "label_decoder": {"epochs": 3},
    }


def deployed_head(bundle, model, *, depth: float, head_runtime=None, tail_runtime=None) -> DeployedHead:
    """The head of ``bundle`` as deployed; a hardened bundle's (declared defence) via ``auditor.defences``."""
    from auditor.attacks import heads

    if getattr(bundle.manifest, "defence", None) is not None:
        from auditor.defences.exposed import deployed_head as hardened  # the defence's own view of its head

        return hardened(bundle, model, depth=depth, head_runtime=head_runtime, tail_runtime=tail_runtime)
    return heads.from_bundle(bundle, model, depth=depth, head_runtime=head_runtime, tail_runtime=tail_runtime)


def entry(outcome) -> dict:
    """One attack's report.json entry: its settings at the top (as the first schema had them), then the rest."""
    d = dict(outcome.settings)
    d.update({"title": outcome.title, "threat_model": outcome.threat_model, "baseline": outcome.baseline,
              "n": outcome.n, "metrics": outcome.metrics, "sweep": outcome.sweep, "beyond_label": outcome.beyond_label,
              "seconds": outcome.seconds, "skipped": outcome.skipped, "notes": outcome.notes, "target": TARGET})
    if outcome.name == "decoder" and outcome.skipped is None:
        per = outcome.settings.get("per_budget", {})
        top = per.get(str(outcome.settings.get("train_n")), {})
        d.setdefault("final_train_mse", top.get("final_train_mse"))
        d["epochs"] = top.get("epochs", d.get("epochs"))
        d["train_images"] = "training set (disjoint from the attacked test images)"
    return d


def attack_cut(spec, head: DeployedHead, sent, x_test, y_test, aux: AuxData, *, model, judge, attack_n: int,
               seed: int, progress: bool):
    """Every attack and baseline of the audit on one head: (report entries, the AttackReport)."""
    from auditor.attacks import ATTACKS, BASELINES, run_attacks

    names = list(spec.attacks or ATTACKS) + list(BASELINES)
    settings = {k: v for k, v in attack_settings(spec, attack_n).items() if k in names}
    rep = run_attacks(head, x_test, aux, attacks=names, settings=settings, labels=y_test, model=model, judge=judge,
                      seed=seed, progress=progress, sent=np.asarray(sent, np.float32))
    return {o.name: entry(o) for o in rep.outcomes}, rep


class Hardened:
    """One hardened cut to audit beside its unhardened one: its bundle, its Keras model, its sweep point."""

    def __init__(self, bundle, model_path, label: str, point: dict | None = None, sweep: dict | None = None):
        self.bundle, self.model_path, self.label, self.point, self.sweep = bundle, model_path, label, point, sweep

    @property
    def layer(self) -> str:
        return self.bundle.manifest.cut

    def load_model(self):
        from converter import zoo

        try:
            import converter.defended  # noqa: F401  (registers the defence layer for loading)
        except ImportError:
            pass
        return zoo.load_model(str(self.model_path))


def load_hardened(path, which: str = "chosen") -> tuple[list, dict | None]:
    """(hardened cuts, sweep or None) from an ``edgesplit harden`` output or a hardened bundle.

    A single ``harden`` output (``harden.json``, ``bundle/``, ``model.keras``) gives its one point; an
    output with ``sweep.json`` gives its chosen point (``which="chosen"``; the Pareto front when
    none was chosen) or every Pareto point (``which="pareto"``); a bundle directory needs the
    hardened ``model.keras`` beside it (as ``harden`` writes them).
    """
    import json
    from pathlib import Path

    from protocol.errors import UsageError
    from protocol.manifest import load_bundle

    root = Path(path).expanduser()
    if (root / "sweep.json").is_file():
        sweep = json.loads((root / "sweep.json").read_text())
        points = sweep.get("points") or []
        picks = [sweep["chosen"]] if which == "chosen" and sweep.get("chosen") is not None else sweep.get("pareto") or []
        out = []
        for i in picks:
            p = points[i]
            paths = p.get("paths") or {}
            bundle_dir, model = (root / paths[k] if paths.get(k) else None for k in ("bundle", "model"))
            if i == sweep.get("chosen") and not (bundle_dir and bundle_dir.exists()):
                bundle_dir, model = root / "bundle", root / "model.keras"   # the chosen point, promoted
            if not (bundle_dir and bundle_dir.exists() and model and model.is_file()):
                raise UsageError(f"{root / 'sweep.json'}: the bundle or model of point {p.get('label', i)} is not "
                                 f"there ({bundle_dir}, {model})",
                                 fix="keep the directory `edgesplit harden --sweep --out` wrote as it was")
            out.append(Hardened(load_bundle(bundle_dir), model,
                                p.get("label") or f"{p.get('method')} {p.get('strength')}", point=p, sweep=sweep))
        return out, sweep
    if (root / "harden.json").is_file() and (root / "bundle" / "manifest.json").is_file():
        record = json.loads((root / "harden.json").read_text())
        point = record.get("point") or {}
        b = load_bundle(root / "bundle")
        return [Hardened(b, root / "model.keras", point.get("label") or _label(b, root), point=point,
                         sweep={"baseline": record.get("baseline")} if record.get("baseline") else None)], None
    if (root / "manifest.json").is_file():
        model = next((m for m in (root / "model.keras", root.parent / "model.keras") if m.is_file()), None)
        if model is None:
            raise UsageError(f"{root} is a bundle, but the hardened model.keras is not beside it",
                             fix="pass the `edgesplit harden` output directory (it holds sweep.json)")
        b = load_bundle(root)
        return [Hardened(b, model, _label(b, root))], None
    raise UsageError(f"{root} is neither an `edgesplit harden` output (sweep.json or harden.json) nor a bundle",
                     fix="pass the directory `edgesplit harden --out` wrote")


def _label(bundle, root) -> str:
    d = getattr(bundle.manifest, "defence", None)
    if d is None:
        return root.parent.name
    strength = getattr(d, "strength", None)
    return f"{getattr(d, 'method', 'defence')} {strength:g}" if isinstance(strength, (int, float)) else str(
        getattr(d, "method", "defence"))
