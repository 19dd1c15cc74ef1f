"""The auditor: how much of the private input the features sent at each cut give away.

Public names (each imported on first use, so ``import auditor`` stays cheap):

* ``auditor.audit``, the module: ``audit(model_or_bundle, cuts=None, n=None, preset=None, seed=None,
  out=DIR, **budgets_and_options)`` runs an audit and returns an ``AuditResult`` (``.summary()``,
  ``.to_dict()``, ``.cuts``, ``.recommendation``); ``AuditSpec`` holds its checked settings (both
  also public here);
* ``write_report(result, out)`` (``auditor.report``) — report.html / report.json / report.md;
* ``PAPER_TABLE1``, ``PRESETS`` (``auditor.paper``) — Tuor et al.'s Table 1 and the presets.

The modules behind them:

* ``auditor.invert`` — white-box inversion (eq. 1) and the learned decoder;
* ``auditor.metrics`` — MSE, PSNR, SSIM, the model's accuracy on reconstructions;
* ``auditor.mi`` / ``auditor.usable`` — the paper's KDE bound and the measures that do not saturate;
* ``auditor.sigma`` — the KDE bounds over a grid of noise variances sigma^2, where each layer leaves its ceiling;
* ``auditor.dynamics`` / ``auditor.compression`` — ``edgesplit iplane``: train while recording every
  layer's information (Saxe et al.'s network with ibsgd's settings, or a zoo model), snapshots and
  resume, and where the run compresses;
* ``auditor.paper`` — Tuor et al.'s Table 1, the tolerance a row of ours agrees within, the presets;
* ``auditor.features`` — the tensors really sent (LiteRT head → wire frame → dequantized);
* ``auditor.report`` — report.html / report.json / report.md (``auditor.report.iplane``: the
  information plane over training).
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "audit": "auditor.audit",          # the module (a name equal to a submodule's would be shadowed by it)
    "AuditSpec": "auditor.audit",
    "AuditResult": "auditor.audit",
    "write_report": "auditor.report",
    "PAPER_TABLE1": "auditor.paper",
    "PRESETS": "auditor.paper",
})
