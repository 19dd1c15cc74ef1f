"""The paper's KDE mutual information (auditor.mi): known answers, and fast == plain."""
from __future__ import annotations

import math

import numpy as np
import pytest

from auditor import mi
from protocol.errors import UsageError

FIGURES = ("ixt_upper", "ixt_lower", "iyt_upper", "iyt_lower")


def _both(t, y=None, **kw):
    return mi.kde_mi(t, y, method="fast", **kw), mi.kde_mi(t, y, method="plain", **kw)


def _assert_same(a, b, tol=1e-6):
    for f in FIGURES:
        va, vb = getattr(a, f), getattr(b, f)
        if va is None:
            assert vb is None
            continue
        assert abs(va - vb) <= tol, f"{f}: fast {va!r} vs plain {vb!r}"


def _direct(t, y, sigma2):
    """The formula with every distance computed as a sum of squared differences (no Gram form)."""
    from scipy.special import logsumexp

    t = np.asarray(t, np.float64).reshape(len(t), -1)
    dist = ((t[:, None, :] - t[None, :, :]) ** 2).sum(axis=-1)
    n = len(t)
    out = {}
    for name, h in (("upper", 2 * sigma2), ("lower", 8 * sigma2)):
        lse = logsumexp(-dist / h, axis=1)
        out["ixt_" + name] = (math.log(n) - lse.mean()) / math.log(2)
        same = y[:, None] == y[None, :]
        lse_y = logsumexp(np.where(same, -dist / h, -np.inf), axis=1)
        _, counts = np.unique(y, return_counts=True)
        h_y = -(counts / n * np.log(counts / n)).sum()
        out["iyt_" + name] = (h_y - (lse - lse_y).mean()) / math.log(2)
    return out


@pytest.mark.parametrize("method", mi.METHODS)
@pytest.mark.parametrize("d", [3, 500])
def test_points_far_apart_reach_the_ceilings_exactly(method, d):
    rng = np.random.default_rng(0)
    n = 300
    t = rng.normal(size=(n, d))
    t *= 1e3 / np.linalg.norm(t, axis=1, keepdims=True).min()  # every pair far beyond the kernels
    t += np.arange(n)[:, None] * 50.0
    y = np.arange(n) % 7
    r = mi.kde_mi(t, y, method=method)
    assert r.ixt_upper == pytest.approx(math.log2(n), abs=1e-12)
    assert r.ixt_lower == pytest.approx(math.log2(n), abs=1e-12)
    assert r.log2_n == pytest.approx(math.log2(n))
    assert r.h_y == pytest.approx(mi.label_entropy_bits(y))
    assert r.iyt_upper == pytest.approx(r.h_y, abs=1e-12)
    assert r.iyt_lower == pytest.approx(r.h_y, abs=1e-12)
    assert all(r.saturated.values()) and r.saturated_x and r.saturated_y


@pytest.mark.parametrize("method", mi.METHODS)
def test_identical_points_carry_nothing(method):
    y = np.arange(200) % 10
    r = mi.kde_mi(np.full((200, 300), 0.7, np.float32), y, method=method)
    for f in FIGURES:
        # zero up to rounding: the squared distances come from |a|^2 + |b|^2 - 2ab, whose
        # cancellation leaves ~1e-12 bits on some CPUs' BLAS kernels (3.3e-12 seen on one)
        assert getattr(r, f) == pytest.approx(0.0, abs=1e-9)
    assert not any(r.saturated.values())


@pytest.mark.parametrize("method", mi.METHODS)
def test_groups_of_identical_points_give_log2_of_the_group_count(method):
    # k far-apart groups of m identical points: every row sum is m, so I(X;T) = log2(N / m) = log2 k
    # for both bounds; labels = groups, so I(Y;T) = H(Y) = log2 k as well
    k, m = 12, 25
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(k, 200)) * 100
    t = np.repeat(centres, m, axis=0)
    y = np.repeat(np.arange(k), m)
    r = mi.kde_mi(t, y, method=method)
    # plain's Gram form ||a||^2 + ||b||^2 - 2 a.b leaves ~1e-16 ||a||^2 of a zero distance (here
    # norms ~1400: ~1e-8 bit); fast recomputes such near pairs by direct differences: exact
    tol = 1e-12 if method == "fast" else 1e-7
    for f in FIGURES:
        assert getattr(r, f) == pytest.approx(math.log2(k), abs=tol)
    assert not r.saturated_x and r.saturated_y


def test_two_points_match_the_closed_form():
    for delta in (0.05, 0.3, 1.0, 2.0):
        t = np.array([[0.0, 0.0], [delta, 0.0]])
        for method in mi.METHODS:
            r = mi.kde_mi(t, method=method, sigma2=0.1)
            assert r.ixt_upper == pytest.approx(1 - math.log2(1 + math.exp(-delta ** 2 / 0.2)), abs=1e-12)
            assert r.ixt_lower == pytest.approx(1 - math.log2(1 + math.exp(-delta ** 2 / 0.8)), abs=1e-12)
            assert r.iyt_upper is None and r.h_y is None


def test_gaussian_mutual_information_lies_between_the_bounds():
    # T ~ N(0, s^2) in one dimension, noise sigma^2: I(T; T + noise) = 1/2 log2(1 + s^2 / sigma^2)
    # = 1.73 bits.  The KDE bounds bracket the mixture's MI, which tends to that value with N
    # (here lower ~1.41, upper ~2.38 for every seed tried).
    s2, sigma2 = 1.0, 0.1
    exact = 0.5 * math.log2(1 + s2 / sigma2)
    for seed in (2, 3):
        t = np.random.default_rng(seed).normal(scale=math.sqrt(s2), size=(2000, 1))
        r = mi.kde_mi(t, sigma2=sigma2)
        assert r.ixt_lower + 0.1 < exact < r.ixt_upper - 0.1
        assert r.ixt_upper - r.ixt_lower < 1.2   # informative, far from the ceiling log2 N = 11
        assert not r.saturated_x


def test_well_separated_clusters_give_the_full_label_entropy():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=800)
    t = rng.normal(scale=0.02, size=(800, 150)) + 40.0 * np.eye(4)[y] @ rng.normal(size=(4, 150))
    fast, plain = _both(t, y)
    _assert_same(fast, plain)
    assert fast.iyt_upper == pytest.approx(fast.h_y, abs=1e-9)
    assert fast.iyt_lower == pytest.approx(fast.h_y, abs=1e-9)
    assert fast.ixt_upper < fast.log2_n - 0.01  # the points within a cluster overlap: not saturated


def test_the_gram_form_matches_direct_differences():
    rng = np.random.default_rng(4)
    t = rng.normal(scale=0.25, size=(120, 40)) + rng.integers(0, 3, size=(120, 1))
    y = rng.integers(0, 3, size=120)
    ref = _direct(t, y, 0.1)
    for method in mi.METHODS:
        r = mi.kde_mi(t, y, method=method)
        for f in FIGURES:
            assert getattr(r, f) == pytest.approx(ref[f], abs=1e-9), (method, f)


@pytest.mark.parametrize("sigma2", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("d", [16, 700])
def test_fast_equals_plain_on_mixed_near_and_far_data(sigma2, d):
    # clusters at several scales: tight duplicates, medium neighbours and far outliers, so the
    # pruning skips some pairs, keeps others, and the bound is tested near its threshold
    rng = np.random.default_rng(5)
    n = 900
    centres = rng.normal(size=(25, d)) * rng.choice([0.5, 3.0, 30.0], size=(25, 1))
    lab = rng.integers(0, 25, size=n)
    spread = rng.choice([1e-3, 0.05, 0.3, 1.0], size=(n, 1))
    t = (centres[lab] + rng.normal(size=(n, d)) * spread / math.sqrt(d)).astype(np.float32)
    y = lab % 10
    fast, plain = _both(t, y, sigma2=sigma2)
    _assert_same(fast, plain)
    assert 0 < fast.pairs_computed <= fast.pairs_total


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-8])
def test_fast_stays_within_its_stated_error_for_any_tol(tol):
    # distances spread over the whole range around the threshold, so a loose tol really skips
    # pairs that carry kernel mass: the figures may move, but by less than 2 tol / ln 2 bits
    rng = np.random.default_rng(9)
    t = rng.normal(size=(700, 300)) * rng.uniform(0.02, 0.3, size=(700, 1))
    y = np.arange(700) % 5
    plain = mi.kde_mi(t, y, method="plain")
    fast = mi.kde_mi(t, y, method="fast", tol=tol)
    for f in FIGURES:
        assert abs(getattr(fast, f) - getattr(plain, f)) <= 2 * tol / math.log(2) + 1e-12, f
    assert fast.pairs_computed < plain.pairs_computed


@pytest.mark.parametrize("n, d", [(2, 500), (3, 129), (40, 1000), (70, 3)])
def test_fast_equals_plain_on_tiny_sets(n, d):
    rng = np.random.default_rng(n + d)
    t = rng.normal(scale=0.3, size=(n, d)) / math.sqrt(d) * 4
    fast, plain = _both(t, np.arange(n) % 2)
    _assert_same(fast, plain, tol=1e-9)


def test_fast_skips_pairs_and_says_so():
    rng = np.random.default_rng(6)
    t = rng.normal(size=(600, 400)) * 3.0
    fast, plain = _both(t, np.arange(600) % 10)
    _assert_same(fast, plain)
    assert fast.pairs_computed < fast.pairs_total / 10
    assert plain.pairs_computed == plain.pairs_total == 600 * 599 // 2
    assert fast.tol == mi.TOL_DEFAULT and plain.tol == 0.0
    assert fast.detail["thr"] > 0


def test_fast_equals_plain_on_a_trained_cnn(tiny_model, synthetic):
    import keras

    x, y = synthetic
    names = [layer.name for layer in tiny_model.layers if layer.name != "flatten"
             and not isinstance(layer, keras.layers.InputLayer)]
    feats = keras.Model(tiny_model.inputs, [tiny_model.get_layer(nm).output for nm in names])
    outs = feats.predict(x, batch_size=250, verbose=0)
    for name, out in zip(names, outs):
        for sigma2 in (0.1, 1.0):
            fast, plain = _both(out, y, sigma2=sigma2)
            _assert_same(fast, plain)
    # the softmax layer is far from its ceiling, and carries most of the label
    last = mi.kde_mi(outs[-1], y)
    assert last.ixt_upper < last.log2_n - 1.0
    assert last.iyt_upper > 0.5 * last.h_y


def test_result_fields_and_summary():
    rng = np.random.default_rng(7)
    r = mi.kde_mi(rng.normal(size=(50, 4, 4, 2)), np.eye(5)[np.arange(50) % 5], sigma2=0.5)  # one-hot labels
    d = r.to_dict()
    assert (r.n, r.d, r.sigma2) == (50, 32, 0.5)
    assert set(FIGURES) <= set(d) and set(d["saturated"]) == set(FIGURES)
    assert r.h_y == pytest.approx(math.log2(5))
    assert "ceiling log2 N" in r.summary() and "H(Y)" in r.summary()


def test_progress_bars_do_not_change_the_result():
    rng = np.random.default_rng(8)
    t = rng.normal(size=(300, 200))
    a = mi.kde_mi(t, progress=True)
    b = mi.kde_mi(t, progress=False)
    assert a.ixt_upper == b.ixt_upper and a.ixt_lower == b.ixt_lower


@pytest.mark.parametrize("bad, match", [
    (dict(t=np.zeros((1, 3))), "N >= 2"),
    (dict(t=np.array([[0.0], [np.nan]])), "NaN"),
    (dict(t=np.zeros((4, 2)), sigma2=0.0), "sigma2"),
    (dict(t=np.zeros((4, 2)), method="exact"), "method"),
    (dict(t=np.zeros((4, 2)), y=np.zeros(3)), "labels"),
    (dict(t=np.zeros((4, 2)), tol=0.0), "tol"),
])
def test_bad_input_is_refused(bad, match):
    kw = dict(bad)
    t = kw.pop("t")
    y = kw.pop("y", None)
    with pytest.raises(UsageError, match=match):
        mi.kde_mi(t, y, **kw)
