"""Does the deployed head apply the defence its manifest declares?  Measured, not read.

:func:`verify_bundle` sends the same images twice through ``runtime.split.Head`` (what a device
runs) and compares the two sendings: with no op declared they must be identical; with noise the
spread of their difference must match the declared standard deviation; with dropout the share
of elements zeroed must match the declared rate.  It also checks the Keras model against the
manifest (``converter.defended.check_matches``).  A mismatch raises CheckFailed.
"""
from __future__ import annotations

import math

import numpy as np

from protocol.errors import CheckFailed

#: relative tolerance on the measured noise scale and the absolute one on the drop rate
SCALE_TOLERANCE = 0.15
RATE_TOLERANCE = 0.05


def verify_bundle(bundle, model, x) -> dict:
    """Measure the deployed head's defence on images ``x``; CheckFailed when it is not the declared one."""
    from converter.defended import check_matches
    from runtime.split import Head

    check_matches(bundle.manifest, model)
    head = Head(bundle)
    spec, feature = bundle.manifest.defence, bundle.feature
    x = np.asarray(x, np.float32)
    a, b = feature.dequantize(head.features(x)), feature.dequantize(head.features(x))
    fix = f"rebuild it: {bundle.manifest.convert_command()}"
    op = spec.op if spec is not None else "none"
    out = {"op": op, "n": int(len(x))}
    if op == "none":
        same = bool(np.array_equal(a, b))
        out.update(identical=same)
        if not same:
            raise CheckFailed(f"bundle {bundle.bundle_id} declares no noise but its head sent different tensors "
                              f"for the same images ({float(np.mean(a != b)):.1%} of the elements)", fix=fix)
        return out
    if op == "noise":
        declared = float(np.sqrt(np.mean(np.square(spec.scale))))
        step = float(feature.scale) if feature.quantized else 0.0
        # two independent draws: var(a - b) = 2 (sigma^2 + step^2 / 12); clipping at the int8 range is rare
        measured = float(math.sqrt(max(np.var(a - b) / 2.0 - step * step / 12.0, 0.0)))
        out.update(declared_std=declared, measured_std=measured)
        if declared > 0 and abs(measured - declared) > SCALE_TOLERANCE * declared:
            raise CheckFailed(f"bundle {bundle.bundle_id} declares noise of standard deviation {declared:.4g} but its "
                              f"head's sendings differ as if it were {measured:.4g}", fix=fix)
        return out
    raw = head.model.run(x).reshape(a.shape)      # the clean head, before the device's mask
    live = raw != (spec.head_zero_point if spec.head_zero_point is not None else 0)
    dropped = float(np.mean((a == 0) & live) / max(np.mean(live), 1e-12))
    out.update(declared_rate=float(spec.rate), measured_rate=dropped)
    if abs(dropped - spec.rate) > RATE_TOLERANCE:
        raise CheckFailed(f"bundle {bundle.bundle_id} declares dropout at rate {spec.rate:g} but its head dropped "
                          f"{dropped:.1%} of the nonzero elements", fix=fix)
    return out
