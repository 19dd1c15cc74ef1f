"""Defences that harden a cut, judged by the attacks beside them (``edgesplit harden``).

* ``auditor.defences.registry`` — the methods by name: noise (Gaussian/Laplace, fixed or learned
  as Shredder), dropout kept on at inference, NoPeek, a variational information bottleneck,
  adversarial training against a decoder; one small module each;
* ``auditor.defences.finetune`` — the fine-tuning loop they share;
* ``converter.defended`` — the one Keras layer at the cut that holds the defence, and
  ``protocol.defence`` — its declaration in the manifest, applied on the device.

Nothing is imported here, so ``import auditor.defences`` stays cheap.
"""
