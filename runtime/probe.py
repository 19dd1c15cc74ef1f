"""A bundle's self-test (the manifest's ``probe``, see ``protocol.probe``): made at convert time,
run by a device on the new head before it switches to it and by a worker on the new tail.

::

    probe = make_probe(bundle)                   # runs the LiteRT head and tail, writes probe.npz
    check_head(Head(bundle), bundle)             # ProbeResult; .ok, .message
    check_tail(Tail(bundle), bundle)
"""
from __future__ import annotations

import dataclasses

import numpy as np

from protocol.errors import UpdateError, UpdateReason
from protocol.manifest import Bundle
from protocol.probe import ARRAYS, PROBE_FILE, Probe

__all__ = ["make_probe", "check_head", "check_tail", "ProbeResult", "load_arrays"]

DEFAULT_N = 4
SEED = 20          # fixed: the same model always gets the same probe inputs


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """How far a run was from the stored outputs."""

    part: str                  # "head" or "tail"
    n: int
    max_abs: float
    mean_abs: float
    limit_abs: float
    limit_mean: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.limit_abs and self.mean_abs <= self.limit_mean

    @property
    def message(self) -> str:
        verdict = "matches" if self.ok else "does not match"
        return (f"the {self.part} {verdict} its probe on {self.n} inputs: largest difference {self.max_abs:g} "
                f"(allowed {self.limit_abs:g}), mean {self.mean_abs:.3g} (allowed {self.limit_mean:g})")


def _diff(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    if got.shape != want.shape:
        return float("inf"), float("inf")
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if not np.all(np.isfinite(d)):
        return float("inf"), float("inf")
    return (float(d.max()), float(d.mean())) if d.size else (0.0, 0.0)


def make_probe(bundle: Bundle, n: int = DEFAULT_N, *, seed: int = SEED, backend=None) -> Probe:
    """Run ``bundle``'s head and tail (LiteRT) on ``n`` seeded random inputs in the input's range, write
    ``probe.npz`` into its directory and return the manifest's ``probe`` (re-write the manifest after)."""
    from runtime.split import Head, Tail

    spec = bundle.manifest.input
    lo, hi = spec.preprocess.value_range
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, size=(n, *spec.shape)).astype(np.float32)
    features = Head(bundle, backend=backend).features(x)
    outputs = np.asarray(Tail(bundle, backend=backend).run(features), np.float32)
    np.savez(bundle.root / PROBE_FILE, inputs=x, features=features, outputs=outputs)
    feat = bundle.manifest.feature
    if feat.quantized:
        # a few steps where another CPU's kernels round differently, never most of a tensor
        f_abs, f_mean = 4.0, 0.25
    else:
        top = float(np.max(np.abs(features))) if features.size else 1.0
        f_abs, f_mean = 0.02 * max(top, 1e-6), 0.002 * max(top, 1e-6)
    top_out = float(np.max(np.abs(outputs))) if outputs.size else 1.0
    return Probe(file=PROBE_FILE, n=n, feature_max_abs=f_abs, feature_max_mean=f_mean,
                 output_max_abs=0.05 * max(top_out, 1.0))


def load_arrays(bundle: Bundle) -> tuple[Probe, dict[str, np.ndarray]]:
    """The manifest's probe and its arrays; UpdateError ``no-probe`` when there is none to run."""
    probe = bundle.manifest.probe
    rebuild = f"re-run `{bundle.manifest.convert_command()}` with this edgesplit (it stores a probe)"
    if probe is None:
        raise UpdateError(UpdateReason.NO_PROBE, f"bundle {bundle.bundle_id} has no self-test probe", fix=rebuild)
    if probe.file not in bundle.manifest.files:
        raise UpdateError(UpdateReason.NO_PROBE, f"bundle {bundle.bundle_id}'s probe file {probe.file} is not "
                          f"among its hashed files", fix=rebuild)
    try:
        with np.load(bundle.root / probe.file, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ARRAYS}
    except (OSError, KeyError, ValueError) as exc:
        raise UpdateError(UpdateReason.NO_PROBE, f"bundle {bundle.bundle_id}'s {probe.file} cannot be read: {exc}",
                          fix=rebuild) from None
    if any(len(a) != probe.n for a in arrays.values()):
        raise UpdateError(UpdateReason.NO_PROBE, f"{probe.file} does not hold {probe.n} of each array", fix=rebuild)
    return probe, arrays


def check_head(head, bundle: Bundle) -> ProbeResult:
    """Run ``head`` (a ``runtime.split.Head`` of ``bundle``) on the probe inputs; compare with the stored features."""
    probe, a = load_arrays(bundle)
    got = head.features(a["inputs"].astype(np.float32, copy=False))
    mx, mean = _diff(np.asarray(got), a["features"])
    return ProbeResult("head", probe.n, mx, mean, probe.feature_max_abs, probe.feature_max_mean)


def check_tail(tail, bundle: Bundle) -> ProbeResult:
    """Run ``tail`` (a ``runtime.split.Tail``) on the stored features; compare with the stored outputs."""
    probe, a = load_arrays(bundle)
    got = np.asarray(tail.run(a["features"]), np.float32)
    mx, mean = _diff(got, a["outputs"])
    return ProbeResult("tail", probe.n, mx, mean, probe.output_max_abs, probe.output_max_abs)
