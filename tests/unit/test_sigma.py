"""The sigma^2 sweep of the KDE bounds (auditor.sigma): what theory fixes, and equality with auditor.mi."""
from __future__ import annotations

import math

import numpy as np
import pytest

from auditor import mi, sigma


def _clusters(n=240, d=6, seed=0):
    """Ten Gaussian clusters of labelled points: a layer-like cloud with some structure."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    centres = rng.normal(scale=2.0, size=(10, d))
    return centres[y] + rng.normal(scale=0.7, size=(n, d)), y


def test_both_bounds_fall_monotonically_as_sigma2_grows():
    t, y = _clusters()
    sw = sigma.sweep(t, y)
    for key in ("ixt_upper", "ixt_lower"):
        values = getattr(sw, key)
        # never rising; strictly falling once off the ceiling (on it, every kernel term but the
        # self term underflows to 0 and neighbouring sigma^2 give the same figure exactly)
        assert all(a >= b for a, b in zip(values, values[1:])), (key, values)
        off = [v for v in values if v < sw.log2_n - 1e-9]
        assert len(off) >= len(values) // 2 and all(a > b for a, b in zip(off, off[1:])), (key, values)
        # from the ceiling (every point distinguishable) towards 0 (the noise drowns everything)
        assert values[0] == pytest.approx(sw.log2_n, abs=1e-6)
        assert values[-1] < 0.25 * sw.log2_n
    for key in ("iyt_upper", "iyt_lower"):  # from H(Y) towards 0, never rising (see auditor.sigma)
        values = getattr(sw, key)
        assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), (key, values)
        assert values[0] == pytest.approx(sw.h_y, abs=1e-6) and values[-1] < 0.5 * sw.h_y
    for i in range(len(sw.grid)):
        assert sw.ixt_lower[i] <= sw.ixt_upper[i] + 1e-12
        assert sw.iyt_lower[i] <= sw.iyt_upper[i] + 1e-12
        assert sw.iyt_upper[i] <= sw.h_y + 1e-12


def test_the_sweep_equals_the_estimator_at_each_sigma2():
    t, y = _clusters(n=1100, d=40, seed=1)  # more than one block of rows
    sw = sigma.sweep(t, y, grid=(1e-3, 0.1, 0.4, 3.2))
    for s in (1e-3, 0.1, 3.2):
        ref = mi.kde_mi(t, y, sigma2=s, method="plain")
        got = sw.at(s)
        for key in ("ixt_upper", "ixt_lower", "iyt_upper", "iyt_lower"):
            assert got[key] == pytest.approx(getattr(ref, key), abs=1e-9), (s, key)


def test_where_a_layer_leaves_its_ceiling():
    t, y = _clusters()
    sw = sigma.sweep(t, y)
    s = sw.leaves["ixt_upper"]
    i = next(k for k, v in enumerate(sw.ixt_upper) if v < sw.log2_n - mi.SATURATION_BITS)
    assert sw.grid[i - 1] <= s <= sw.grid[i]
    assert "between sigma^2" in sw.leaves_note["ixt_upper"]
    # the lower bound is the upper one at 4 sigma^2: it leaves 4 times earlier
    assert sw.leaves["ixt_lower"] == pytest.approx(s / 4, rel=0.3)
    # points far apart never leave the ceiling within the grid
    far = np.arange(50)[:, None] * np.ones((1, 3)) * 1e3
    sw_far = sigma.sweep(far, np.arange(50) % 5)
    assert sw_far.leaves["ixt_upper"] is None and "at every sigma^2" in sw_far.leaves_note["ixt_upper"]


def test_the_paper_order_is_found_where_it_holds():
    rng = np.random.default_rng(3)
    y = np.arange(300) % 10
    base = rng.normal(size=(300, 8))
    # three "layers", each a contraction of the one before: the order is shallow > deep once off the ceiling
    layers = [base * 4.0, base * 2.0, base * 1.0]
    sweeps = [sigma.sweep(x, y) for x in layers]
    paper = {"a": (13.4, 3.4), "b": (13.3, 3.3), "c": (13.2, 3.2)}
    got = sigma.paper_ranking(["a", "b", "c"], sweeps, paper, 0.1)
    holds = got["ixt_upper"]["holds_at"]
    assert holds and got["ixt_upper"]["paper_order"] == ["a", "b", "c"]
    for s in holds:
        i = sweeps[0].grid.index(s)
        assert sweeps[0].ixt_upper[i] > sweeps[1].ixt_upper[i] + mi.SATURATION_BITS
    # at the smallest sigma^2 all three sit on the ceiling: a tie, not an order
    assert sweeps[0].grid[0] not in holds
    assert "holds in our float64 figures at sigma^2" in got["statement"]
