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
# the registry has its own module so that auditor.attacks.run can read it without importing this package
from auditor.attacks.registry import ATTACKS, BASELINES, REGISTRY, get, register, threat_models


def run_attacks(*args, **kwargs):
    """See :func:`auditor.attacks.run.run_attacks`."""
    from auditor.attacks.run import run_attacks as _run

    return _run(*args, **kwargs)


__all__ = ["ATTACKS", "BASELINES", "REGISTRY", "Attack", "AuxData", "DeployedHead", "Reconstruction",
           "ThreatModel", "get", "register", "run_attacks", "threat_models"]
