"""The auditor: how much of the private input the features sent at each cut give away.

Entry point: ``from auditor.audit import audit, AuditSpec, AuditResult``

* ``audit(model_or_bundle, cuts=None, n=None, preset=None, seed=None, out=DIR, **budgets_and_options)``
  runs an audit and returns an ``AuditResult`` (``.summary()``, ``.to_dict()``, ``.cuts``,
  ``.recommendation``); ``AuditSpec`` holds its checked settings.
* ``auditor.invert`` — white-box inversion (eq. 1) and the learned decoder;
* ``auditor.metrics`` — MSE, PSNR, SSIM, the model's accuracy on reconstructions;
* ``auditor.mi`` / ``auditor.usable`` — the paper's KDE bound and the measures that do not saturate;
* ``auditor.paper`` — Tuor et al.'s Table 1, the tolerance a row of ours agrees within, the presets;
* ``auditor.features`` — the tensors really sent (LiteRT head → wire frame → dequantized);
* ``auditor.report`` — report.html / report.json / report.md.

Nothing is imported here, so ``import auditor`` stays cheap.
"""
