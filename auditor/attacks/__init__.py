"""Reconstruction attacks graded by what the attacker knows, behind one registry.

    from auditor.attacks import run_attacks, heads
    head = heads.from_bundle(bundle, keras_model)          # or a hardened head (auditor.defences)
    report = run_attacks(head, x_victims, AuxData(x_own, y_own), settings={"whitebox": {"iters": 300}})
    report.strongest().metrics["psnr_db"], report.beyond_label()

=================  ==================  =====================================================
name               threat model        the attacker has
=================  ==================  =====================================================
``whitebox``       white-box           the head's weights (eq. 1 with a TV prior)
``decoder``        query access        its own images sent through the deployed head
``architecture``   architecture only   the head's layers, not their weights (UnSplit)
``queryfree``      query-free          the tail and its own labelled images (He et al.)
``label_mean``     label only          the predicted class: its own mean image of that class
``label_decoder``  label only          the predicted class: a decoder from the label alone
=================  ==================  =====================================================

Each attack is a small class (``auditor.attacks.base.Attack``) registered here by name; the two
label-only ones are baselines: scored the same way, they are what the cloud learns anyway, and
every attack's score is also given beyond them.
"""
from __future__ import annotations

from auditor.attacks.base import Attack, AuxData, DeployedHead, Reconstruction, ThreatModel

#: name -> Attack class, in the order the report shows them
REGISTRY: dict[str, type[Attack]] = {}
#: the four attacks (not the baselines), strongest knowledge first
ATTACKS = ("whitebox", "decoder", "architecture", "queryfree")
#: the label-only baselines
BASELINES = ("label_mean", "label_decoder")


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: put an attack in :data:`REGISTRY` under its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two attacks are called {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str, **settings) -> Attack:
    """A configured attack by registry name (ValueError naming the known ones)."""
    _load()
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name](**settings)


def threat_models() -> dict:
    """name -> the threat model of every registered attack and baseline (as dicts)."""
    _load()
    return {name: cls.threat_model.to_dict() for name, cls in REGISTRY.items()}


def _load() -> None:
    # Importing the modules registers their classes; they import TensorFlow only when run.
    import importlib

    for module in ("whitebox", "decoder", "architecture", "queryfree", "label"):  # the report's order
        importlib.import_module(f"auditor.attacks.{module}")


def run_attacks(*args, **kwargs):
    """See :func:`auditor.attacks.run.run_attacks`."""
    from auditor.attacks.run import run_attacks as _run

    return _run(*args, **kwargs)


__all__ = ["ATTACKS", "BASELINES", "REGISTRY", "Attack", "AuxData", "DeployedHead", "Reconstruction",
           "ThreatModel", "get", "register", "run_attacks", "threat_models"]
