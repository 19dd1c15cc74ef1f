"""The manifest's ``probe``: inputs a bundle is checked on wherever it is installed, and what its
head and tail must give for them (``runtime.probe`` makes and runs them).

``edgesplit convert`` runs the real LiteRT head and tail on a few seeded random inputs (no
user data in a bundle) and stores inputs and outputs in ``probe.npz``, a bundle file like any
other (hashed in ``files``).  A device runs the new head on the inputs before it switches to
a bundle; a cloud worker runs the new tail on the stored features before it serves one.  The
tolerances allow the few quantization steps another CPU's kernels may round differently, far
below what a wrong head gives.
"""
from __future__ import annotations

from typing import Annotated

import msgspec

PROBE_FILE = "probe.npz"
ARRAYS = ("inputs", "features", "outputs")

_FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
_Tol = Annotated[float, msgspec.Meta(ge=0.0)]


class Probe(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``file`` holds arrays ``inputs`` (n head inputs), ``features`` (the head's tensors as sent) and
    ``outputs`` (the tail's answers); a run passes when no element differs by more than ``max_abs``
    and the mean difference is at most ``max_mean`` (features in the wire dtype's units)."""

    file: _FileName
    n: Annotated[int, msgspec.Meta(ge=1, le=256)]
    feature_max_abs: _Tol
    feature_max_mean: _Tol
    output_max_abs: _Tol
