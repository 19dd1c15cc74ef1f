"""Information measures that do not saturate, so that cuts can be ranked.

The paper's KDE bound (``auditor.mi``) sits on its ceiling for every hidden layer.
These three measures keep moving:

* :func:`label_information` -- *usable information* about the label (Xu et al.,
  ICLR 2020, "V-information"): how many bits of cross-entropy a held-out probe
  saves over the best constant guess.  The probe is a multinomial logistic
  regression (L2, strength chosen on a validation slice of the training set) on
  the whitened top principal components of the training features.  Trained on one
  set (the attacker's own images), scored on another (the audited test images).
* :func:`input_information` -- what a decoder's reconstruction error says about
  the input, as a Gaussian rate-distortion figure (see ``INPUT_BITS_NOTE``).
* :func:`distance_correlation` -- Szekely's distance correlation between the
  inputs and the features, the dependence measure NoPeek (Vepakomma et al. 2020)
  minimises; exact O(n^2) on a seeded subsample, float64.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from protocol.errors import UsageError

log = logging.getLogger(__name__)

#: Regularisation strengths the probe chooses from (on a validation slice).
PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
#: The probe sees at most this many principal components of the features.
PROBE_MAX_DIM = 128
#: ...found on at most this many training rows when the features are wider than that
PROBE_BASIS_ROWS = 2000
#: Distance correlation uses at most this many (seeded) samples: O(n^2) memory and time.
DCOR_MAX_N = 1000
#: Smallest per-pixel MSE taken at face value: the noise of 8-bit quantisation, (1/255)^2 / 12.
MSE_FLOOR = (1.0 / 255.0) ** 2 / 12.0

INPUT_BITS_NOTE = (
    "Gaussian rate-distortion bits per image: the rate R(D) that an independent Gaussian source with "
    "the test images' per-pixel variances needs to be reproduced at the decoder's mean squared error D "
    "(reverse water-filling; D floored at the 8-bit quantisation noise (1/255)^2/12). If the input were "
    "that Gaussian, the features would carry at least this many bits about it; for real images it is a "
    "monotone, comparable score of how much of the input the decoder recovers, not a bound on I(X;T).")

_LN2 = math.log(2.0)


def _flat(a) -> np.ndarray:
    """Rows flattened; float32 stays float32 (the probe projects it in float32), the rest float64."""
    a = np.asarray(a)
    a = a.reshape(a.shape[0], -1)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _flat64(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1).astype(np.float64, copy=False)


# --------------------------------------------------------------------------- label probe
@dataclass(frozen=True)
class ProbeResult:
    """Usable information about the label from a held-out linear probe, in bits."""

    label_bits: float       # null_ce_bits - probe_ce_bits: bits of the label the features make usable
    probe_ce_bits: float    # the probe's mean cross-entropy on the held-out set, bits per sample
    null_ce_bits: float     # cross-entropy of the training label frequencies on the held-out set
    h_y: float              # empirical entropy of the held-out labels (the ceiling), bits
    accuracy: float         # the probe's held-out accuracy
    n_train: int
    n_test: int
    dim: int                # feature dimensions seen by the probe (principal components)
    l2: float               # chosen regularisation strength
    probe: str = "multinomial logistic regression on whitened top principal components (numpy/scipy L-BFGS)"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"usable label information {self.label_bits:.3f} bits (ceiling H(Y) = {self.h_y:.3f}); "
                f"probe CE {self.probe_ce_bits:.3f} vs null {self.null_ce_bits:.3f} bits, accuracy "
                f"{self.accuracy:.4f}, {self.dim} components, l2 {self.l2:g}, "
                f"train {self.n_train} / test {self.n_test}")


def label_information(train_f, train_y, test_f, test_y, *, seed: int = 0, max_dim: int = PROBE_MAX_DIM,
                      l2_grid=PROBE_L2_GRID) -> ProbeResult:
    """Usable information (bits) the features carry about the label, for a linear probe.

    The probe is trained on ``(train_f, train_y)`` and scored on ``(test_f, test_y)``:
    ``label_bits = CE(null) - CE(probe)`` on the test set, where the null predictor is
    the training label frequencies (Laplace-smoothed).  Close to H(Y) when the label is
    linearly readable, about 0 when the features say nothing about it (it can dip
    slightly below 0 when the probe overfits; it is reported as measured).
    """
    xtr, xte = _flat(train_f), _flat(test_f)
    ytr, yte = np.asarray(train_y).ravel(), np.asarray(test_y).ravel()
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise UsageError("features and labels differ in length", fix="pass one label per feature row")
    if xtr.shape[1] != xte.shape[1]:
        raise UsageError(f"train and test features differ in size: {xtr.shape[1]} vs {xte.shape[1]}",
                         fix="take both from the same cut")
    if len(xtr) < 10 or len(xte) < 1:
        raise UsageError("the probe needs at least 10 training and 1 test samples", fix="use more samples")
    classes = np.unique(np.concatenate([ytr, yte]))
    ctr, cte = np.searchsorted(classes, ytr), np.searchsorted(classes, yte)
    c = len(classes)

    ztr, zte = _whitened_components(xtr, xte, max_dim, seed)

    # Regularisation chosen on a seeded 20 % validation slice of the training set, then refit on all of it.
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ztr))
    nval = max(1, len(ztr) // 5)
    val, fit = perm[:nval], perm[nval:]
    best, w = None, None
    for l2 in sorted(l2_grid, reverse=True):  # strongest first, each fit warm-starts the next
        w = _fit_softmax(ztr[fit], ctr[fit], c, l2, start=w)
        ce = _cross_entropy_nats(ztr[val], ctr[val], w)
        if best is None or ce < best[0]:
            best = (ce, l2, w)
    l2 = best[1]
    w = _fit_softmax(ztr, ctr, c, l2, start=best[2])

    probe_ce = _cross_entropy_nats(zte, cte, w) / _LN2
    prior = (np.bincount(ctr, minlength=c) + 1.0) / (len(ctr) + c)
    null_ce = float(-np.mean(np.log2(prior[cte])))
    pte = np.bincount(cte, minlength=c) / len(cte)
    pte = pte[pte > 0]
    h_y = float(-(pte * np.log2(pte)).sum())
    acc = float(np.mean(np.argmax(_logits(zte, w), axis=1) == cte))
    return ProbeResult(label_bits=null_ce - probe_ce, probe_ce_bits=probe_ce, null_ce_bits=null_ce, h_y=h_y,
                       accuracy=acc, n_train=len(xtr), n_test=len(xte), dim=ztr.shape[1], l2=float(l2))


def probe_usable_information(features, labels, *, seed: int = 0, **kw) -> ProbeResult:
    """:func:`label_information` on one set split in two seeded halves (train on one, score the other)."""
    x, y = np.asarray(features), np.asarray(labels).ravel()
    perm = np.random.default_rng(seed).permutation(len(x))
    half = len(x) // 2
    a, b = perm[:half], perm[half:]
    return label_information(x[a], y[a], x[b], y[b], seed=seed, **kw)


def _whitened_components(xtr, xte, max_dim, seed, basis_rows=PROBE_BASIS_ROWS):
    """Centre on the training mean, keep the top principal directions of the training set, whiten.

    With more than ``max_dim`` dimensions the directions come from a randomized SVD (Halko
    et al. 2011, no power iteration) of at most ``basis_rows`` seeded training rows, and
    the features are projected in their own precision (float32 features stay float32).
    """
    n, d = xtr.shape
    mu = xtr.mean(axis=0, dtype=np.float64)
    k = min(max_dim, d, n - 1)
    if d <= max_dim:
        _, s, vt = np.linalg.svd(np.asarray(xtr, np.float64) - mu, full_matrices=False)
    else:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, basis_rows), replace=False))
        a = np.asarray(xtr[rows], np.float64) - mu
        q, _ = np.linalg.qr(a @ rng.standard_normal((d, k + 10)))
        b = q.T @ a
        # SVD of the small (k+10) x d matrix through its (k+10) x (k+10) Gram matrix
        ev, u = np.linalg.eigh(b @ b.T)
        top = np.argsort(ev)[::-1]
        s = np.sqrt(np.maximum(ev[top], 0.0))
        vt = (u[:, top].T @ b) / np.maximum(s, 1e-300)[:, None]
    keep = s[:k] > s[0] * 1e-9 if s.size and s[0] > 0 else np.zeros(0, bool)
    v = vt[:k][keep].T
    if v.shape[1] == 0:  # constant features: the probe sees nothing
        return np.zeros((n, 0)), np.zeros((len(xte), 0))
    shift = mu @ v
    vv = v.astype(xtr.dtype) if xtr.dtype == np.float32 else v
    ztr = np.asarray(xtr @ vv, np.float64) - shift
    zte = np.asarray(xte.astype(vv.dtype, copy=False) @ vv, np.float64) - shift
    scale = ztr.std(axis=0) + 1e-300
    return ztr / scale, zte / scale


def _logits(z, w):
    return z @ w[:-1] + w[-1]


def _cross_entropy_nats(z, codes, w):
    from scipy.special import logsumexp

    lg = _logits(z, w)
    return float(np.mean(logsumexp(lg, axis=1) - lg[np.arange(len(codes)), codes]))


def _fit_softmax(z, codes, c, l2, max_iter=300, start=None):
    """Multinomial logistic regression: mean cross-entropy + l2/2 ||W||^2 (bias free), L-BFGS."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    n, k = z.shape
    onehot = np.zeros((n, c))
    onehot[np.arange(n), codes] = 1.0

    def loss(flat):
        w = flat.reshape(k + 1, c)
        lg = z @ w[:-1] + w[-1]
        lse = logsumexp(lg, axis=1)
        value = np.mean(lse - lg[np.arange(n), codes]) + 0.5 * l2 * np.sum(w[:-1] ** 2)
        g = (np.exp(lg - lse[:, None]) - onehot) / n
        grad = np.vstack([z.T @ g + l2 * w[:-1], g.sum(axis=0, keepdims=True)])
        return value, grad.ravel()

    x0 = np.zeros((k + 1) * c) if start is None else start.ravel()
    got = minimize(loss, x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter})
    if not got.success:
        log.debug("probe optimiser stopped: %s", got.message)
    return got.x.reshape(k + 1, c)


# --------------------------------------------------------------------------- decoder error
def gaussian_rate_bits(mse: float, pixel_var) -> float:
    """R(D) in bits of independent Gaussian pixels with variances ``pixel_var`` at mean squared error ``mse``.

    Reverse water-filling: D_k = min(lam, var_k) with sum_k D_k = d * mse, and
    R = sum_k 1/2 log2(var_k / D_k).  Zero when mse >= mean(var).
    """
    var_all = np.asarray(pixel_var, dtype=np.float64).ravel()
    budget = float(mse) * var_all.size  # total distortion over all d pixels
    s = np.sort(var_all[var_all > 0])   # constant pixels cost nothing and take no distortion
    if s.size == 0 or budget >= s.sum():
        return 0.0
    if budget <= 0.0:
        return math.inf
    # with the i smallest variances given up entirely (D = var), the rest share the level
    # lam_i = (budget - their sum) / (m - i); the water level is the first lam_i <= s[i]
    m = s.size
    given_up = np.concatenate([[0.0], np.cumsum(s)[:-1]])
    lam = (budget - given_up) / (m - np.arange(m))
    i = int(np.argmax(lam <= s))
    return float(0.5 * np.sum(np.log2(s[i:] / lam[i])))


def input_information(x, reconstruction) -> float:
    """Bits per image the decoder's error implies, as stated in ``INPUT_BITS_NOTE``."""
    a, b = _flat64(x), _flat64(reconstruction)
    if a.shape != b.shape:
        raise UsageError(f"inputs and reconstructions differ in shape: {a.shape} vs {b.shape}",
                         fix="pass one reconstruction per input image")
    mse = max(float(np.mean((a - b) ** 2)), MSE_FLOOR)
    return gaussian_rate_bits(mse, a.var(axis=0))


# --------------------------------------------------------------------------- distance correlation
def _centred_distances(a, unbiased):
    sq = np.einsum("ij,ij->i", a, a)
    dist = sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    np.sqrt(dist, out=dist)
    n = len(a)
    if not unbiased:
        row = dist.mean(axis=1)
        return dist - row[:, None] - row[None, :] + row.mean()
    # U-centring (Szekely & Rizzo 2014): zero diagonal, sums over n-2 and (n-1)(n-2)
    row = dist.sum(axis=1)
    out = dist - row[:, None] / (n - 2) - row[None, :] / (n - 2) + row.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def distance_correlation(x, z, *, n: int = DCOR_MAX_N, seed: int = 0, unbiased: bool = False) -> float:
    """Szekely's distance correlation between samples ``x`` and ``z`` (rows paired), in [0, 1].

    ``unbiased=False`` (default, as NoPeek): the V-statistic, sqrt(dCov^2 / sqrt(dVar^2_x dVar^2_z))
    with double-centred distance matrices; 1 when z is a similarity of x (rotation, scale, shift), tends to 0
    with n for independent samples.  ``unbiased=True``: the bias-corrected dCor^2 of Szekely &
    Rizzo (2014) from U-centred matrices, reported as sqrt(max(., 0)); about 0 for independent
    samples at any n.  At most ``n`` rows are used (a seeded subsample), in float64.
    """
    a, b = np.asarray(x), np.asarray(z)
    if len(a) != len(b):
        raise UsageError(f"x and z must pair row by row: {len(a)} vs {len(b)} rows",
                         fix="pass the inputs and the features of the same samples")
    if len(a) < 4:
        raise UsageError("distance correlation needs at least 4 samples", fix="use more samples")
    if len(a) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(a), size=n, replace=False))
        a, b = a[idx], b[idx]
    a, b = _flat64(a), _flat64(b)
    a = a - a.mean(axis=0)  # distances do not change; the Gram form loses less to rounding
    b = b - b.mean(axis=0)
    ca = _centred_distances(a, unbiased)
    cb = _centred_distances(b, unbiased)
    dcov = float(np.sum(ca * cb))
    var_a, var_b = float(np.sum(ca * ca)), float(np.sum(cb * cb))
    if var_a <= 0.0 or var_b <= 0.0:
        return 0.0  # a constant variable is independent of everything
    r2 = dcov / math.sqrt(var_a * var_b)
    return float(math.sqrt(min(max(r2, 0.0), 1.0)))
