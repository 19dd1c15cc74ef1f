"""How much the paper's KDE figures depend on the noise variance sigma^2.

The estimator of ``auditor.mi`` adds Gaussian noise of variance sigma^2 to the features to
make mutual information finite; its value is a property of that choice as much as of the
layer.  Tuor et al. and Saxe et al. use sigma^2 = 0.1 on MNIST (``ibsgd``,
``MNIST_ComputeMI.ipynb``: ``noise_variance = 1e-1``); ibsgd's own notebook for the small
IB network uses 1e-3 (``IBnet_ComputeMI.ipynb``).  At 0.1 the hidden layers of the paper's
CNN sit on the ceiling log2 N: every test image is distinguishable.  A sweep shows at which
sigma^2 each layer leaves its ceiling, and whether an order of layers holds at any sigma^2.

What theory says: both bounds on I(X;T) fall monotonically as sigma^2 grows (each kernel
term exp(-D_ij / 2 sigma^2) grows, so each row's log-sum grows), from log2 N (all samples
distinct, sigma^2 -> 0) to 0 (sigma^2 -> infinity).  I(Y;T) goes from H(Y) to 0; the true
I(Y; T + noise) cannot rise with the noise (data processing: Y -> T + Z -> T + Z + Z'), and
the estimator, a difference of two bounds, did not rise on any configuration we tried
(random and adversarial small sets), though we have no proof that it cannot.

One pass computes every sigma^2 of the grid: the float64 distances of each block of pairs
(upper triangle only, rows centred, Gram form as ``mi``'s plain method) are made once and
every kernel width is evaluated on them.  No pair can be skipped at the grid's widest kernels,
so this costs one full Gram product, N^2 d / 2 multiply-adds (paper-cnn's conv1 at N = 10,000:
1.3e12, a few minutes on two cores): far more than ``mi``'s pruned estimate at one sigma^2.  The lower bound at sigma^2 is the upper-bound
kernel at 4 sigma^2, so a grid of ratio 2 shares its widths.  The result equals
``mi.kde_mi(method="plain")`` at each sigma^2 to rounding (a unit test checks 1e-9 bit).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from auditor import mi
from protocol.errors import UsageError

#: sigma^2 = 0.1 x 2^k, k = -10..14: 9.8e-5 ... 1638, the paper's 0.1 exactly on the grid, ratio 2
#: (so the lower bound's 4 sigma^2 is a grid width too).  The top is far above 10 because the
#: paper CNN's nearest neighbours are 25-80 apart (squared distance, N = 1,000): its hidden
#: layers leave the ceiling only at sigma^2 of a few units and fall towards 0 after 100.
GRID_DEFAULT = tuple(0.1 * 2.0 ** k for k in range(-10, 15))
#: rows per block of pairs (a block of distances is BLOCK x BLOCK float64)
BLOCK = 1024
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class SigmaSweep:
    """The four KDE bounds (bits) of one set of features at every sigma^2 of ``grid``.

    ``leaves`` says, per figure, at which sigma^2 it first falls more than
    ``mi.SATURATION_BITS`` below its ceiling (log-linear interpolation between grid points):
    a number, or None with ``leaves_note`` saying why (saturated at every sigma^2 of the grid,
    or below the ceiling already at the smallest).
    """

    grid: list
    ixt_upper: list
    ixt_lower: list
    iyt_upper: list | None
    iyt_lower: list | None
    n: int
    d: int
    log2_n: float
    h_y: float | None
    leaves: dict = field(default_factory=dict)
    leaves_note: dict = field(default_factory=dict)
    seconds: float = 0.0

    def at(self, sigma2: float) -> dict:
        """The four figures at the grid point ``sigma2`` (KeyError when not on the grid)."""
        for i, s in enumerate(self.grid):
            if math.isclose(s, sigma2, rel_tol=1e-9):
                return {k: (getattr(self, k)[i] if getattr(self, k) is not None else None)
                        for k in ("ixt_upper", "ixt_lower", "iyt_upper", "iyt_lower")}
        raise KeyError(sigma2)

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(t, y=None, grid=GRID_DEFAULT, *, progress: bool = False) -> SigmaSweep:
    """KDE bounds of features ``t`` (N x ...) with labels ``y`` at every sigma^2 of ``grid``."""
    grid = sorted(float(s) for s in grid)
    if not grid or not all(s > 0 and math.isfinite(s) for s in grid):
        raise UsageError(f"the sigma^2 grid must be positive numbers, got {grid!r}",
                         fix="use the default grid (1e-4 to 1638)")
    t = np.asarray(t)
    if t.ndim < 2 or t.shape[0] < 2:
        raise UsageError(f"need features of shape (N, ...) with N >= 2, got {t.shape}",
                         fix="pass one row of features per sample, at least two samples")
    x = t.reshape(t.shape[0], -1)
    if not np.isfinite(x).all():
        raise UsageError("features contain NaN or inf; the estimator needs finite values",
                         fix="check the model's outputs for overflow")
    codes, counts = mi._label_codes(y, x.shape[0])
    start = time.perf_counter()
    widths = sorted({2.0 * s for s in grid} | {8.0 * s for s in grid})
    s_all, s_cls = _row_sums(x, codes, widths, progress)
    n, d = x.shape
    ln_n = math.log(n)
    col = {h: k for k, h in enumerate(widths)}
    lse_all = np.log1p(s_all)  # (W, N): the self term exp(0) = 1 added here
    lse_cls = np.log1p(s_cls)
    out = {}
    for name, factor in (("upper", 2.0), ("lower", 8.0)):
        ks = [col[factor * s] for s in grid]
        out["ixt_" + name] = [(ln_n - float(lse_all[k].mean())) / _LN2 for k in ks]
        if codes is not None:
            p = counts / n
            h_y = float(-(p * np.log(p)).sum()) / _LN2
            out["iyt_" + name] = [h_y - float((lse_all[k] - lse_cls[k]).mean()) / _LN2 for k in ks]
    h_y = mi.label_entropy_bits(y) if codes is not None else None
    log2_n = ln_n / _LN2
    leaves, notes = {}, {}
    for key, ceiling in (("ixt_upper", log2_n), ("ixt_lower", log2_n), ("iyt_upper", h_y), ("iyt_lower", h_y)):
        if key in out:
            leaves[key], notes[key] = leaves_ceiling(grid, out[key], ceiling)
    return SigmaSweep(grid=grid, ixt_upper=out["ixt_upper"], ixt_lower=out["ixt_lower"],
                      iyt_upper=out.get("iyt_upper"), iyt_lower=out.get("iyt_lower"), n=n, d=d, log2_n=log2_n,
                      h_y=h_y, leaves=leaves, leaves_note=notes, seconds=time.perf_counter() - start)


def leaves_ceiling(grid, values, ceiling, margin: float = mi.SATURATION_BITS):
    """(sigma^2, note): where ``values`` first fall more than ``margin`` below ``ceiling``.

    Interpolated linearly in log sigma^2 between the last grid point on the ceiling and the
    first below it; None with a note when the grid does not bracket the crossing.
    """
    level = ceiling - margin
    below = [v < level for v in values]
    if not any(below):
        return None, f"on its ceiling at every sigma^2 up to {grid[-1]:.3g}"
    i = below.index(True)
    if i == 0:
        return None, f"below its ceiling already at sigma^2 = {grid[0]:.3g}"
    v0, v1 = values[i - 1], values[i]
    f = (v0 - level) / (v0 - v1) if v0 != v1 else 1.0
    s = math.exp(math.log(grid[i - 1]) + f * (math.log(grid[i]) - math.log(grid[i - 1])))
    return s, f"between sigma^2 = {grid[i - 1]:.3g} and {grid[i]:.3g}"


def _row_sums(x, codes, widths, progress):
    """Per width h: sum over j != i of exp(-D_ij / h), over all j and over j of i's label."""
    n = x.shape[0]
    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=min(n, mi.BASIS_SAMPLE), replace=False)
    mu = np.asarray(x[np.sort(sample)]).mean(axis=0, dtype=np.float64)  # any centre is exact
    y = codes if codes is not None else np.zeros(n, np.intp)
    inv_h = -1.0 / np.asarray(widths)
    w = len(widths)
    s_all = np.zeros((w, n))
    s_cls = np.zeros((w, n))
    starts = list(range(0, n, BLOCK))
    bar = mi._bar(len(starts) * (len(starts) + 1) // 2, progress, "KDE sigma^2 sweep", unit="blocks")
    for bi, lo in enumerate(starts):
        a = np.subtract(x[lo:lo + BLOCK], mu, dtype=np.float64)
        sq_a = np.einsum("ij,ij->i", a, a)
        ya = y[lo:lo + len(a)]
        for lo_b in starts[bi:]:
            b = a if lo_b == lo else np.subtract(x[lo_b:lo_b + BLOCK], mu, dtype=np.float64)
            sq_b = sq_a if lo_b == lo else np.einsum("ij,ij->i", b, b)
            dist = a @ b.T
            dist *= -2.0
            dist += sq_a[:, None]
            dist += sq_b[None, :]
            np.maximum(dist, 0.0, out=dist)
            mi._refine_near(dist, a, b, sq_a, sq_b, 1e3 * widths[0])  # as mi does, for the narrowest kernel
            same = ya[:, None] == y[lo_b:lo_b + len(b)][None, :]
            if lo_b == lo:  # the diagonal block: each unordered pair once, no self pair
                keep = np.triu(np.ones(dist.shape, bool), 1)
            for k in range(w):
                ker = np.exp(dist * inv_h[k])
                if lo_b == lo:
                    ker *= keep
                s_all[k, lo:lo + len(a)] += ker.sum(axis=1)
                s_all[k, lo_b:lo_b + len(b)] += ker.sum(axis=0)
                ker *= same
                s_cls[k, lo:lo + len(a)] += ker.sum(axis=1)
                s_cls[k, lo_b:lo_b + len(b)] += ker.sum(axis=0)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return s_all, s_cls


# ----------------------------------------------------------------- the paper's order

def order_holds(values: list, margin: float = mi.SATURATION_BITS) -> tuple[bool, list]:
    """Whether ``values`` (shallow to deep) fall strictly, each by more than ``margin``; the pairs that do not."""
    broken = [i for i in range(len(values) - 1) if not values[i] - values[i + 1] > margin]
    return not broken, broken


def paper_ranking(names: list, sweeps: list, paper_values: dict, sigma2_used: float) -> dict:
    """At which sigma^2 of the grid the paper's order of the layers would hold in our figures.

    ``names`` and ``sweeps`` are the audited cuts (shallow to deep) and their sweeps;
    ``paper_values[name] = (I(X;B), I(Y;B))`` the paper's figures.  The paper's Table 1 falls
    strictly with depth in both columns; we ask for the same order with every step larger
    than ``mi.SATURATION_BITS`` (a smaller step is a tie at the estimator's resolution).
    """
    rows = [(nm, sw) for nm, sw in zip(names, sweeps) if nm in paper_values]
    if len(rows) < 2:
        return {"cuts": [nm for nm, _ in rows], "statement": "fewer than two of the paper's layers were audited: "
                "no order to check"}
    names = [nm for nm, _ in rows]
    grid = rows[0][1].grid
    out = {"cuts": names, "grid": grid, "margin_bits": mi.SATURATION_BITS}
    texts = []
    for key, col, label in (("ixt_upper", 0, "I(X;B)"), ("iyt_upper", 1, "I(Y;B)")):
        paper_order = [nm for nm in sorted(names, key=lambda nm: -paper_values[nm][col])]
        holds_at = []
        for i in range(len(grid)):
            vals = {nm: getattr(sw, key)[i] for nm, sw in rows}
            ok, _ = order_holds([vals[nm] for nm in paper_order])
            if ok:
                holds_at.append(grid[i])
        out[key] = {"paper_order": paper_order, "holds_at": holds_at}
        order_text = " > ".join(paper_order)
        if holds_at:
            texts.append(f"the paper's order of {label} ({order_text}, each step > {mi.SATURATION_BITS} bit) holds "
                         f"in our float64 figures at sigma^2 = {_list(holds_at)}")
        else:
            texts.append(f"the paper's order of {label} ({order_text}) holds at no sigma^2 of the grid "
                         f"({grid[0]:.3g} to {grid[-1]:.3g})")
        i_used = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / sigma2_used)))
        _, broken = order_holds([getattr(dict(rows)[nm], key)[i_used] for nm in paper_order])
        out[key]["broken_at_used"] = [[paper_order[b], paper_order[b + 1]] for b in broken]
    both = sorted(set(out["ixt_upper"]["holds_at"]) & set(out["iyt_upper"]["holds_at"]))
    out["both_hold_at"] = both
    statement = "; ".join(texts)
    statement += (f"; both at sigma^2 = {_list(both)}" if both else "; never both at one sigma^2")
    used = out["ixt_upper"]["broken_at_used"]
    if used:
        statement += (f". At the paper's sigma^2 = {sigma2_used:g} the order breaks at "
                      + ", ".join(f"{a} vs {b}" for a, b in used) + " (ties on the ceiling)")
    out["statement"] = statement[0].upper() + statement[1:] + "."
    return out


def _list(values) -> str:
    values = list(values)
    if len(values) > 3 and all(math.isclose(b / a, 2.0, rel_tol=1e-6) for a, b in zip(values, values[1:])):
        return f"{values[0]:.3g} to {values[-1]:.3g}"
    return ", ".join(f"{v:.3g}" for v in values)


# ----------------------------------------------------------------- the audit's view

def sensitivity(rows, sigma2_used: float, paper_values: dict | None = None) -> dict:
    """What the audit reports: per cut where each figure leaves its ceiling, and the paper's order.

    ``rows`` are the audit's cuts (``.name`` and ``.kde["sigma_sweep"]``, a :class:`SigmaSweep` dict).
    """
    sweeps = [(r.name, SigmaSweep(**r.kde["sigma_sweep"])) for r in rows if r.kde.get("sigma_sweep")]
    if not sweeps:
        return {}
    out = {"grid": sweeps[0][1].grid, "features": "float", "sigma2_used": sigma2_used,
           "margin_bits": mi.SATURATION_BITS,
           "cuts": {nm: {"leaves": sw.leaves, "notes": sw.leaves_note} for nm, sw in sweeps}}
    if paper_values is not None:
        out["paper_ranking"] = paper_ranking([nm for nm, _ in sweeps], [sw for _, sw in sweeps], paper_values,
                                             sigma2_used)
    return out


def leaves_text(info: dict) -> list[str]:
    """One line per cut: the sigma^2 at which I(X;B) and I(Y;B) (upper bounds) leave their ceilings."""
    lines = []
    for nm, c in info.get("cuts", {}).items():
        parts = []
        for key, label in (("ixt_upper", "I(X;B)"), ("iyt_upper", "I(Y;B)")):
            s = c["leaves"].get(key)
            parts.append(f"{label} at sigma^2 = {s:.3g}" if s is not None else f"{label} {c['notes'].get(key)}")
        lines.append(f"{nm}: " + ", ".join(parts))
    return lines
