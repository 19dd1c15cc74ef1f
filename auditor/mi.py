"""Mutual information of a cut by the paper's estimator: pairwise-distance Gaussian KDE.

Tuor et al. (SPIE 2018) use the bound of Kolchinsky & Tracey (Entropy 2017) as
Saxe et al. coded it (`ibsgd`, ``kde.py``): the features T are the centres of a
mixture of Gaussians with covariance sigma^2 I (the "noise" added to make MI
finite), and the entropy of that mixture is bounded with pairwise distances,

    H_upper(T) = d/2 + d/2 ln(2 pi sigma^2) - 1/N sum_i ln[1/N sum_j exp(-D_ij / (2 sigma^2))]
    H_lower(T) = H_upper(T) at 4 sigma^2, plus d/2 ln(1/4)            (Bhattacharyya)
    H(T|X)     = d/2 ln(2 pi e sigma^2)                                (the added noise)

with D_ij = ||t_i - t_j||^2.  The d-dependent constants cancel, leaving

    I(X;T) = ln N - 1/N sum_i ln sum_j exp(-D_ij / h),  h = 2 sigma^2 (upper), 8 sigma^2 (lower)
    I(Y;T) = H(T) - sum_y p(y) H(T | Y=y)
           = H(Y) - 1/N sum_i [ln sum_j exp(-D_ij/h) - ln sum_{j: y_j = y_i} exp(-D_ij/h)]

(p(y) the empirical label frequencies, H(Y) their entropy).  We evaluate this
constant-free form in float64 and report bits.  Its ceilings are log2 N for
I(X;T) (every row's sum is its own term, 1) and H(Y) for I(Y;T); the paper's
hidden-layer rows sit on them.

Two implementations give the same number:

* ``plain`` -- the formula as written: the full N x N float64 distance matrix
  (Gram form ||a||^2 + ||b||^2 - 2 a.b, row chunks for memory), scipy's
  logsumexp per row.  O(N^2 d).  The reference.
* ``fast`` -- exact speed-ups only (see ``_fast``): a pair (i, j) is skipped only
  when a rigorous lower bound on D_ij proves that all the pairs skipped in row i
  together weigh less than ``tol`` (default 1e-12) beside the row's own term
  exp(0) = 1.  Each row's log-sum then moves by less than ``tol``, every figure by
  less than 2 tol / ln 2 (3e-12 bit): below the rounding error of the plain
  computation itself (about 1e-11 per row for CNN activations) and five orders of
  magnitude below the 1e-6 bit the auditor promises.  ``tol=1e-17`` makes the
  skipped mass smaller than half an ulp of every row sum.  The bound is
  ||V^T(a-b)||^2 + (||a - V V^T a|| - ||b - V V^T b||)^2 <= ||a-b||^2 with V the top
  principal directions of the data; rows are ordered by a principal-axis tree so
  that the pairs that survive it gather into few BLAS blocks, and only those get
  their distance computed, in float64.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from protocol.errors import UsageError

log = logging.getLogger(__name__)

#: Noise variance of the paper (and of ibsgd).
SIGMA2_DEFAULT = 0.1
#: A row is "saturated" when its figure is this close (bits) to its ceiling.
SATURATION_BITS = 0.01
#: ``fast`` neglects, per row, at most this much kernel mass next to the self term 1.
TOL_DEFAULT = 1e-12
METHODS = ("fast", "plain")

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class KdeMI:
    """The paper's KDE estimates for one set of features, in bits, with their ceilings.

    ``ixt_*`` bound I(X;T), ``iyt_*`` bound I(Y;T) (None when no labels were given).
    ``log2_n`` and ``h_y`` are the ceilings; ``saturated[name]`` is True when the
    figure is within ``SATURATION_BITS`` of its ceiling (it then says only "every
    sample is distinguishable at this sigma", not how much the features leak).
    """

    ixt_upper: float
    ixt_lower: float
    iyt_upper: float | None
    iyt_lower: float | None
    n: int
    d: int
    sigma2: float
    log2_n: float
    h_y: float | None
    saturated: dict = field(default_factory=dict)
    method: str = "fast"
    seconds: float = 0.0
    #: pairs i < j whose distance was computed (``plain``: all of them)
    pairs_computed: int = 0
    pairs_total: int = 0
    #: kernel mass ``fast`` may neglect per row (0 for ``plain``); bounds the difference
    #: from the exact formula by 2 tol / ln 2 bits
    tol: float = 0.0
    #: how ``fast`` went: threshold, slack, rows fetched, wall/CPU seconds per phase
    detail: dict = field(default_factory=dict)

    @property
    def saturated_x(self) -> bool:
        return bool(self.saturated.get("ixt_upper"))

    @property
    def saturated_y(self) -> bool:
        return bool(self.saturated.get("iyt_upper"))

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def flag(key):
            return " (saturated)" if self.saturated.get(key) else ""

        lines = [f"KDE MI, N={self.n}, d={self.d}, sigma^2={self.sigma2:g}, {self.method}, "
                 f"{self.seconds:.2f} s",
                 f"  I(X;T) upper {self.ixt_upper:.4f}{flag('ixt_upper')}, lower "
                 f"{self.ixt_lower:.4f}{flag('ixt_lower')}  bits (ceiling log2 N = {self.log2_n:.4f})"]
        if self.iyt_upper is not None:
            lines.append(f"  I(Y;T) upper {self.iyt_upper:.4f}{flag('iyt_upper')}, lower "
                         f"{self.iyt_lower:.4f}{flag('iyt_lower')}  bits (ceiling H(Y) = {self.h_y:.4f})")
        return "\n".join(lines)


def label_entropy_bits(y) -> float:
    """Entropy of the empirical label distribution, in bits."""
    _, counts = np.unique(np.asarray(y).ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def kde_mi(t, y=None, *, sigma2: float = SIGMA2_DEFAULT, method: str = "fast",
           tol: float = TOL_DEFAULT, progress: bool = False) -> KdeMI:
    """I(X;T) and I(Y;T) bounds (bits) of features ``t`` (N x ..., flattened) and labels ``y``.

    ``method`` is ``"fast"`` (exact pruning, the default) or ``"plain"`` (the O(N^2 d)
    reference).  ``tol`` is the kernel mass ``fast`` may neglect per row beside the row's
    own term 1; the figures then differ from the exact formula by less than 2 tol / ln 2
    bits.  ``progress`` shows tqdm bars.  Labels may be integers or one-hot rows.
    """
    t = np.asarray(t)
    if t.ndim < 2 or t.shape[0] < 2:
        raise UsageError(f"need features of shape (N, ...) with N >= 2, got {t.shape}",
                         fix="pass one row of features per sample, at least two samples")
    t = t.reshape(t.shape[0], -1)
    if not np.issubdtype(t.dtype, np.floating):
        t = t.astype(np.float64)
    n, d = t.shape
    if not (sigma2 > 0 and math.isfinite(sigma2)):
        raise UsageError(f"sigma2 must be a positive number, got {sigma2!r}", fix="use the paper's 0.1")
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}", fix="use 'fast' (or 'plain')")
    if not np.isfinite(t).all():
        raise UsageError("features contain NaN or inf; the estimator needs finite values",
                         fix="check the model's outputs for overflow")
    codes, counts = _label_codes(y, n)

    if not (0.0 < tol < 1.0):
        raise UsageError(f"tol must be in (0, 1), got {tol!r}", fix=f"use the default {TOL_DEFAULT:g}")
    start = time.perf_counter()
    detail = {}
    if method == "plain":
        lse_all, lse_cls = _plain(t, codes, counts, sigma2, progress)
        computed = n * (n - 1) // 2
    else:
        lse_all, lse_cls, computed = _fast(t, codes, counts, sigma2, tol, progress, stats=detail)
    seconds = time.perf_counter() - start

    # lse_* : (2, N) natural-log row sums for h = 2 sigma^2 (upper) and 8 sigma^2 (lower)
    ln_n = math.log(n)
    ixt = [(ln_n - float(np.mean(lse_all[k]))) / _LN2 for k in (0, 1)]
    log2_n = ln_n / _LN2
    sat = {"ixt_upper": ixt[0] >= log2_n - SATURATION_BITS,
           "ixt_lower": ixt[1] >= log2_n - SATURATION_BITS}
    iyt = [None, None]
    h_y = None
    if codes is not None:
        p = counts / n
        h_y = float(-(p * np.log(p)).sum()) / _LN2
        iyt = [h_y - float(np.mean(lse_all[k] - lse_cls[k])) / _LN2 for k in (0, 1)]
        sat["iyt_upper"] = iyt[0] >= h_y - SATURATION_BITS
        sat["iyt_lower"] = iyt[1] >= h_y - SATURATION_BITS
    return KdeMI(ixt_upper=ixt[0], ixt_lower=ixt[1], iyt_upper=iyt[0], iyt_lower=iyt[1],
                 n=n, d=d, sigma2=float(sigma2), log2_n=log2_n, h_y=h_y, saturated=sat,
                 method=method, seconds=seconds, pairs_computed=int(computed),
                 pairs_total=n * (n - 1) // 2, tol=float(tol) if method == "fast" else 0.0, detail=detail)


def _label_codes(y, n):
    if y is None:
        return None, None
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    y = y.ravel()
    if y.shape[0] != n:
        raise UsageError(f"got {y.shape[0]} labels for {n} feature rows", fix="pass one label per feature row")
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    return codes.astype(np.intp), counts


def _widths(sigma2):
    """Kernel denominators h of exp(-D/h): upper bound 2 sigma^2, lower bound 2 (4 sigma^2)."""
    return (2.0 * sigma2, 8.0 * sigma2)


def _bar(total, progress, desc, unit="rows"):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


# --------------------------------------------------------------------------- plain
def _plain(t, codes, counts, sigma2, progress, chunk=1024):
    """The formula as written: every distance, every kernel term, logsumexp per row."""
    from scipy.special import logsumexp

    x = np.asarray(t, dtype=np.float64)
    n = x.shape[0]
    sq = np.einsum("ij,ij->i", x, x)
    widths = _widths(sigma2)
    lse_all = np.empty((2, n))
    lse_cls = np.empty((2, n))
    bar = _bar(n, progress, "KDE plain")
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        dist = sq[lo:hi, None] + sq[None, :] - 2.0 * (x[lo:hi] @ x.T)
        np.maximum(dist, 0.0, out=dist)
        dist[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # ||t_i - t_i|| is 0; drop rounding
        for k, h in enumerate(widths):
            logk = -dist / h
            lse_all[k, lo:hi] = logsumexp(logk, axis=1)
            if codes is not None:
                same = codes[lo:hi, None] == codes[None, :]
                lse_cls[k, lo:hi] = logsumexp(np.where(same, logk, -np.inf), axis=1)
        if bar is not None:
            bar.update(hi - lo)
    if bar is not None:
        bar.close()
    return lse_all, lse_cls


# --------------------------------------------------------------------------- fast
#: principal directions of the pruning bound; features with at most EXACT_DIM dimensions
#: use their own coordinates (the bound is then the distance itself)
PROJ_DIM = 64
EXACT_DIM = 128
#: rows per leaf of the ordering tree (one BLAS call per leaf)
LEAF_ROWS = 64
#: rows of the sample the pruning directions are found on
BASIS_SAMPLE = 1000
#: pairs closer than this fraction of their squared norms get their distance by direct differences
NEAR_FRACTION = 1e-4
#: rows cast to float64 at a time (small enough to stay in cache between the steps on them)
CHUNK_ROWS = 256


class _Clock:
    """Adds wall and CPU time since the last call to ``stats["t_<name>"]`` / ``stats["cpu_<name>"]``.

    A no-op without a stats dict.  CPU time (all threads) is the fairer figure on a shared machine.
    """

    def __init__(self, stats):
        self.stats = stats
        self.last = (time.perf_counter(), time.process_time())

    def __call__(self, name):
        if self.stats is None:
            return
        now = (time.perf_counter(), time.process_time())
        for prefix, a, b in (("t_", now[0], self.last[0]), ("cpu_", now[1], self.last[1])):
            self.stats[prefix + name] = self.stats.get(prefix + name, 0.0) + a - b
        self.last = now

    def done(self):
        if self.stats is not None:
            self.stats.update({k: round(v, 3) for k, v in self.stats.items() if k.startswith(("t_", "cpu_"))})


def _tree_order(p, leaf, seed=0):
    """Row order of a principal-axis tree on ``p`` and its leaf bounds.

    Each node is split at the median along its top principal direction, found by a few
    power iterations on the covariance of up to 256 of its rows, started from the line
    through two mutually far rows (no LAPACK call: many tiny threaded calls are slow on a
    busy machine).  Near rows end up in the same or neighbouring leaves, so one leaf's
    surviving pairs concentrate on few columns.  Only the speed depends on this order.
    """
    rng = np.random.default_rng(seed)
    stack, leaves = [np.arange(len(p))], []
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf:
            leaves.append(idx)
            continue
        sub = p[idx]
        probe = sub if len(idx) <= 256 else sub[rng.choice(len(idx), 256, replace=False)]
        probe = probe - probe.mean(axis=0)
        far = probe[np.argmax(np.einsum("ij,ij->i", probe, probe))]
        direction = probe[np.argmax(((probe - far) ** 2).sum(axis=1))] - far
        cov = np.einsum("ij,ik->jk", probe, probe)
        for _ in range(8):
            direction = cov.dot(direction)
            direction /= np.sqrt(direction.dot(direction)) + 1e-300
        o = idx[np.argsort(sub @ direction, kind="stable")]
        half = len(o) // 2
        stack.append(o[half:])  # popped last: keeps left-to-right order
        stack.append(o[:half])
    order = np.concatenate(leaves)
    bounds = np.cumsum([0] + [len(x) for x in leaves])
    return order, bounds


def _refine_near(dist, xr, xc, sq_r, sq_c, scale):
    """Recompute, as sums of squared differences, the distances the Gram form cannot resolve.

    ||a||^2 + ||b||^2 - 2 a.b loses about 1e-16 (||a||^2 + ||b||^2) to cancellation, which is
    most of a tiny distance between two far-from-the-mean rows (near-duplicates).  Those few
    pairs get the direct sum, so identical rows are at distance 0 exactly.  Skipped when the
    squared norms are below ``scale`` (1000 kernel widths): the cancellation cannot matter then.
    """
    if sq_r.max(initial=0.0) + sq_c.max(initial=0.0) < scale:
        return  # rounding of ~1e-16 of these norms is far below what moves a kernel term
    ii, jj = np.nonzero(dist < NEAR_FRACTION * (sq_r[:, None] + sq_c[None, :]))
    batch = max(256, (1 << 20) // max(xr.shape[1], 1))  # about 8 MB of differences at a time
    for lo in range(0, len(ii), batch):
        a, b = ii[lo:lo + batch], jj[lo:lo + batch]
        diff = xr[a] - xc[b]
        dist[a, b] = np.einsum("ij,ij->i", diff, diff)


def _sub_blocks(m, rows, n_cols, starts, worth=0.7):
    """Split one leaf's block by column leaf when that saves enough multiply-adds.

    ``m`` marks the leaf's candidate pairs over the columns from its own start on, ``rows``
    its rows with a candidate, ``n_cols`` its columns with one; ``starts`` are the offsets of
    the column leaves in ``m``.  Returns None (one product over all rows x columns) or a list
    of (row positions within ``rows``, slice c0:c1 of the candidate columns).
    """
    sub = m[rows]
    has = np.logical_or.reduceat(sub, starts[:-1], axis=1)            # row has a candidate in leaf b
    per_leaf = np.add.reduceat(m.any(axis=0), starts[:-1]).astype(np.intp)  # candidate columns in leaf b
    work = int((has.sum(axis=0) * per_leaf).sum())
    if work >= worth * len(rows) * n_cols:
        return None
    edges = np.concatenate([[0], np.cumsum(per_leaf)])
    return [(np.flatnonzero(has[:, b]), int(edges[b]), int(edges[b + 1])) for b in np.flatnonzero(per_leaf)]


def _fast(t, codes, counts, sigma2, tol, progress, *, proj_dim=PROJ_DIM, leaf=LEAF_ROWS, stats=None):
    """The same row sums as ``_plain``, computing only the pairs whose kernel can matter.

    Exactness argument.  Let h_l = 8 sigma^2 (the wider kernel) and thr = h_l ln((N-1)/tol).
    A pair with D_ij > thr has exp(-D_ij/h) < tol/(N-1) for both kernels, so all such
    pairs of a row together weigh less than ``tol`` beside the row's own term 1, and the
    row's log-sum (both kernels, all labels or one) moves by less than ``tol``.  We skip a
    pair only when a lower bound proves D_ij > thr:

        D_ij >= ||V^T(x_i - x_j)||^2 + (r_i - r_j)^2,  r_i = ||x_i - V V^T x_i||,

    for V with orthonormal columns (top principal directions of a row sample): the
    projection and the residual are orthogonal, and the residual part obeys the
    reverse triangle inequality.  The bound is evaluated in float64 and compared with
    thr plus a slack that covers its rounding (orders above the rounding, orders below
    thr).  Every pair not skipped gets its distance from float64 BLAS on the centred
    rows, the same Gram form ``_plain`` uses (centring changes no distance).  With at
    most EXACT_DIM dimensions V is the identity: the "bound" is the distance itself.
    """
    n, d = t.shape
    h_u, h_l = _widths(sigma2)
    thr = h_l * math.log(max(n - 1, 1) / tol)
    clock = _Clock(stats)
    y = codes if codes is not None else np.zeros(n, np.intp)

    # Rows are used centred (no distance changes, and the Gram form ||a||^2 + ||b||^2 - 2 a.b
    # cancels less) and in float64, cast chunk by chunk: no float64 copy of the whole set.
    # Any centre is exact; the mean of a row sample is as good as the mean and saves a pass.
    rng = np.random.default_rng(0)  # the sample only affects speed, never the result
    sample = np.sort(rng.choice(n, size=min(n, BASIS_SAMPLE), replace=False))
    mu = np.asarray(t[sample]).mean(axis=0, dtype=np.float64)

    def rows64(idx):
        return np.subtract(t[idx], mu, dtype=np.float64)

    exact = d <= EXACT_DIM
    if exact:
        p = rows64(np.arange(n))
        sq = np.einsum("ij,ij->i", p, p)
        psq, r = sq, np.zeros(n)
        clock("copy")
    else:
        a = rows64(sample)
        k = min(proj_dim, len(sample), d)
        # randomized range finder (Halko et al. 2011), one power iteration, on the sample
        basis, _ = np.linalg.qr(a.T @ (a @ rng.standard_normal((d, k))))
        del a
        clock("basis")
        p = np.empty((n, k))
        sq = np.empty(n)
        for lo in range(0, n, CHUNK_ROWS):
            c = rows64(slice(lo, lo + CHUNK_ROWS))
            sq[lo:lo + len(c)] = np.einsum("ij,ij->i", c, c)
            p[lo:lo + len(c)] = c @ basis
        psq = np.einsum("ij,ij->i", p, p)
        r = np.sqrt(np.maximum(sq - psq, 0.0))
        clock("project")
    # Rigorous slack for rounding.  With eta = 4 (d + k + 8) 2^-53 (generous for every dot
    # product of length <= d + k, and for the centring's own rounding): each p coordinate is off
    # by <= eta ||x||, r^2 = sq - psq by <= (2 sqrt(k) + 2) eta sq, so r by <= the square root
    # of that; the vector q = (p, r) of a row is off by at most
    # E = sqrt(k) eta ||x|| + sqrt((2 sqrt(k) + 2) eta sq), and a pair's bound, as a distance,
    # by 2 E.  V is orthonormal to k 2^-53 (Householder QR).  The Gram form of the bound below
    # adds <= 4 eta max sq.  For conv1 of the paper model this moves the threshold (about 30)
    # by about 0.01.
    k_dirs = 0 if exact else p.shape[1]
    eta = 4.0 * (d + k_dirs + 8) * 2.0 ** -53
    big = float(sq.max())
    e_max = math.sqrt(k_dirs) * eta * math.sqrt(big) + math.sqrt((2 * math.sqrt(k_dirs) + 2) * eta * big)
    thr_eff = (math.sqrt(thr * (1 + 4 * k_dirs * 2.0 ** -53)) + 2 * e_max) ** 2 + 4 * eta * big
    slack = thr_eff - thr

    order, bounds = _tree_order(p, leaf)
    # q = (p, r): the bound ||p_i - p_j||^2 + (r_i - r_j)^2 is ||q_i - q_j||^2
    #   = sq_i + sq_j - 2 q_i.q_j  (psq + r^2 = sq), one BLAS product per leaf
    q = p[order] if exact else np.hstack([p[order], r[order, None]])
    y_o, sq_o = y[order], sq[order]
    half_sq = 0.5 * sq_o
    clock("order")

    s_all = np.zeros((2, n))  # row sums over j != i; the self term exp(0) = 1 is added at the end
    s_cls = np.zeros((2, n))  # the same over j with i's label
    computed = 0

    def accumulate(ri, cj, dist):
        """Add both kernels of the exact squared distances ``dist`` (rows ri x cols cj, tree order)."""
        nonlocal computed
        np.maximum(dist, 0.0, out=dist)
        k_l = np.exp(dist * (-1.0 / h_l))
        done = np.isfinite(dist) if np.isinf(dist).any() else None  # inf: pieces not computed
        if cj[0] <= ri[-1]:  # the block reaches the diagonal: keep each unordered pair once
            upper = cj[None, :] > ri[:, None]
            k_l *= upper
            computed += int(np.count_nonzero(upper if done is None else upper & done))
        else:
            computed += k_l.size if done is None else int(np.count_nonzero(done))
        k_u = k_l * k_l
        k_u *= k_u  # exp(-D/h_u) = exp(-D/h_l)^4 since h_l = 4 h_u
        same = y_o[ri, None] == y_o[None, cj]
        for kk, ker in ((0, k_u), (1, k_l)):
            s_all[kk, ri] += ker.sum(axis=1)
            s_all[kk, cj] += ker.sum(axis=0)
            ker *= same  # in place: this kernel is not needed any more
            s_cls[kk, ri] += ker.sum(axis=1)
            s_cls[kk, cj] += ker.sum(axis=0)

    # Pass 1: for each leaf (rows a_lo..a_hi of the tree order) the pairs (i, j > i) the bound
    # cannot rule out, kept as the leaf's rows and the union of their columns.  With exact
    # coordinates the "bound" is the distance itself and the block is summed at once.
    blocks = []
    bar = _bar(n, progress, "KDE bound")
    tri = np.triu(np.ones((leaf, leaf), bool), 1)
    for leaf_no, (a_lo, a_hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        g = q[a_lo:a_hi] @ q[a_lo:].T
        # bound <= thr_eff  <=>  q_i.q_j - sq_j / 2 >= sq_i / 2 - thr_eff / 2
        g -= half_sq[None, a_lo:]
        m = g >= (half_sq[a_lo:a_hi] - 0.5 * thr_eff)[:, None]
        w = a_hi - a_lo
        m[:, :w] &= tri[:w, :w]
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size:
            cols = np.flatnonzero(m.any(axis=0))
            if exact:
                ri, cj = rows + a_lo, cols + a_lo
                dist = g if (len(rows), len(cols)) == g.shape else g[np.ix_(rows, cols)]
                dist *= -2.0
                dist += sq_o[ri, None]
                _refine_near(dist, q[ri], q[cj], sq_o[ri], sq_o[cj], 1e3 * h_u)
                accumulate(ri, cj, dist)
            else:
                blocks.append((rows + a_lo, cols + a_lo, _sub_blocks(m, rows, len(cols), bounds[leaf_no:] - a_lo)))
        if bar is not None:
            bar.update(int(w))
    clock("bound")

    # Pass 2: exact float64 distances of the surviving blocks.  Rows are fetched once per block
    # they appear in; when that adds up to several times the data set, one float64 copy in
    # tree order first makes each fetch a plain copy.
    fetched = sum(len(ri) + len(cj) for ri, cj, _ in blocks)
    if fetched > 4 * n:
        xs = np.empty((n, d))
        for lo in range(0, n, CHUNK_ROWS):
            np.subtract(t[order[lo:lo + CHUNK_ROWS]], mu, out=xs[lo:lo + CHUNK_ROWS], dtype=np.float64)
        clock("copy")

        def fetch(pos):
            return xs[pos]
    else:
        def fetch(pos):
            return rows64(order[pos])

    if bar is not None:
        bar.close()
        bar = _bar(len(blocks), progress, "KDE exact", unit="blocks")
    for ri, cj, plan in blocks:
        xr, xc = fetch(ri), fetch(cj)
        sq_r, sq_c = sq_o[ri], sq_o[cj]
        clock("gather")
        if plan is None:
            dist = xr @ xc.T
            dist *= -2.0
            dist += sq_r[:, None]
            dist += sq_c[None, :]
        else:  # only the (row subset, column-leaf) pieces that hold candidates; the rest stays inf
            dist = np.full((len(ri), len(cj)), np.inf)
            for rsub, c0, c1 in plan:
                part = xr[rsub] @ xc[c0:c1].T
                part *= -2.0
                part += sq_r[rsub, None]
                part += sq_c[None, c0:c1]
                dist[rsub, c0:c1] = part
        clock("gemm")
        _refine_near(dist, xr, xc, sq_r, sq_c, 1e3 * h_u)
        accumulate(ri, cj, dist)
        clock("kernel")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if stats is not None:
        stats.update(thr=thr, slack=slack, computed=computed, gathered_rows=fetched, exact_coords=exact)
        clock.done()
    # back to the caller's row order; add the self term and take logs
    inv = np.empty(n, np.intp)
    inv[order] = np.arange(n)
    lse_all = np.log1p(s_all[:, inv])
    lse_cls = np.log1p(s_cls[:, inv])
    return lse_all, lse_cls, computed
