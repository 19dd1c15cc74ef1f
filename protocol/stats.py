"""Percentiles of measured values (latencies, sizes, rates): one definition for every role.

The device's run counters, the device profile (``edgesplit.profile/1``), the demo, the
benchmarks and the hardware-in-the-loop report all summarise with :func:`percentiles`, so a
"p95" means the same thing wherever it is printed.  numpy only: a Raspberry Pi imports it.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def percentiles(values: Iterable[float], qs: Iterable[float] = (50, 95, 99)) -> dict:
    """``n``, ``median``, ``mean``, ``min``, ``max`` and ``p<q>`` for each ``q`` of the finite ``values``.

    Percentiles interpolate linearly between the two nearest values (numpy's default);
    NaN and infinite values are left out; ``{}`` when nothing is left.
    """
    a = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {}
    out = {"n": int(a.size), "median": float(np.median(a)), "mean": float(a.mean()),
           "min": float(a.min()), "max": float(a.max())}
    qs = list(qs)
    for q, v in zip(qs, np.percentile(a, qs)):
        out[f"p{q:g}"] = float(v)
    return out
