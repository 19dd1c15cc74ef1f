"""Measures that do not saturate (auditor.usable): probe, decoder bits, distance correlation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from auditor import usable
from protocol.errors import UsageError


def _blobs(n, d, classes, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * sep
    y = rng.integers(0, classes, size=n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_probe_reads_separable_labels_almost_fully():
    x, y = _blobs(2000, 20, 10, sep=8.0, seed=0)
    r = usable.probe_usable_information(x, y)
    assert r.label_bits >= r.h_y - 0.1
    assert r.label_bits <= r.null_ce_bits + 1e-9  # cannot save more than the null cross-entropy
    assert r.accuracy > 0.98
    assert (r.n_train, r.n_test) == (1000, 1000)


def test_probe_finds_nothing_in_random_labels():
    x, _ = _blobs(2000, 20, 10, sep=8.0, seed=1)
    y = np.random.default_rng(2).integers(0, 10, size=2000)
    r = usable.probe_usable_information(x, y)
    assert abs(r.label_bits) < 0.05
    assert r.accuracy < 0.2


def test_probe_ranks_a_noisier_copy_lower():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, size=3000)
    x = rng.normal(size=(10, 30))[y] + rng.normal(scale=0.5, size=(3000, 30))
    noisy = x + np.random.default_rng(4).normal(scale=2.0, size=x.shape)
    clean_bits = usable.probe_usable_information(x, y).label_bits
    noisy_bits = usable.probe_usable_information(noisy, y).label_bits
    assert clean_bits > noisy_bits + 0.3 > 0.3


def test_probe_on_wide_features_uses_principal_components():
    x, y = _blobs(1200, 8, 4, sep=6.0, seed=5)
    wide = np.hstack([x, np.random.default_rng(6).normal(size=(1200, 3000))]).reshape(1200, 3008, 1)
    r = usable.label_information(wide[:800], y[:800], wide[800:], y[800:], max_dim=64)
    assert r.dim == 64
    assert r.label_bits > 1.0
    assert set(r.to_dict()) >= {"label_bits", "probe_ce_bits", "null_ce_bits", "h_y", "accuracy", "l2"}
    assert "usable label information" in r.summary()


def test_probe_with_constant_features_is_zero():
    y = np.arange(400) % 4
    r = usable.probe_usable_information(np.ones((400, 10)), y)
    assert r.dim == 0
    assert r.label_bits == pytest.approx(0.0, abs=0.02)


def test_probe_refuses_mismatched_input():
    with pytest.raises(UsageError):
        usable.label_information(np.zeros((20, 3)), np.zeros(19), np.zeros((5, 3)), np.zeros(5))
    with pytest.raises(UsageError):
        usable.label_information(np.zeros((20, 3)), np.zeros(20), np.zeros((5, 4)), np.zeros(5))


def test_gaussian_rate_closed_forms():
    # equal variances: d/2 log2(var / D)
    assert usable.gaussian_rate_bits(0.01, np.full(784, 0.1)) == pytest.approx(392 * math.log2(10))
    # distortion at or above the variance: nothing needs sending
    assert usable.gaussian_rate_bits(0.2, np.full(10, 0.1)) == 0.0
    assert usable.gaussian_rate_bits(0.1, np.full(10, 0.1)) == 0.0
    # reverse water-filling: variances 0.01, 0.1, 0.2 and a constant pixel, D = 0.05 per pixel:
    # the 0.01 pixel is given up, the others sit at level 0.095
    got = usable.gaussian_rate_bits(0.05, [0.01, 0.1, 0.2, 0.0])
    assert got == pytest.approx(0.5 * (math.log2(0.1 / 0.095) + math.log2(0.2 / 0.095)))


def test_input_information_falls_as_the_reconstruction_worsens():
    rng = np.random.default_rng(7)
    x = rng.uniform(size=(300, 28, 28, 1)).astype(np.float32)
    bits = [usable.input_information(x, np.clip(x + rng.normal(scale=s, size=x.shape), 0, 1))
            for s in (0.01, 0.05, 0.2)]
    assert bits[0] > bits[1] > bits[2] > 0
    # the mean image is what a decoder that learned nothing returns: zero bits
    assert usable.input_information(x, np.broadcast_to(x.mean(axis=0), x.shape)) == 0.0
    # a perfect copy is capped by the 8-bit quantisation noise, not infinite
    assert math.isfinite(usable.input_information(x, x))
    assert usable.INPUT_BITS_NOTE


def test_distance_correlation_of_a_similarity_is_one():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(400, 6))
    rot, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert usable.distance_correlation(x, 3.0 * x @ rot + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert usable.distance_correlation(x.reshape(400, 2, 3), x) == pytest.approx(1.0, abs=1e-9)
    assert usable.distance_correlation(x, x, unbiased=True) == pytest.approx(1.0, abs=1e-9)


def test_distance_correlation_of_independent_samples_is_about_zero():
    rng = np.random.default_rng(9)
    x, z = rng.normal(size=(1000, 5)), rng.normal(size=(1000, 3))
    assert usable.distance_correlation(x, z) < 0.15                 # V-statistic: small, positive bias
    assert usable.distance_correlation(x, z, unbiased=True) < 0.08  # bias-corrected
    assert usable.distance_correlation(x, np.ones((1000, 4))) == 0.0


def test_distance_correlation_sees_nonlinear_dependence():
    rng = np.random.default_rng(10)
    x = rng.uniform(-1, 1, size=(800, 1))
    assert usable.distance_correlation(x, x ** 2) > 0.3  # Pearson correlation here is ~0
    assert abs(np.corrcoef(x[:, 0], x[:, 0] ** 2)[0, 1]) < 0.1


def test_distance_correlation_subsamples_large_sets():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3000, 4))
    z = x + rng.normal(scale=0.5, size=x.shape)
    a = usable.distance_correlation(x, z, n=500, seed=1)
    b = usable.distance_correlation(x, z, n=500, seed=1)
    c = usable.distance_correlation(x, z, n=3000)
    assert a == b and abs(a - c) < 0.05
    with pytest.raises(UsageError):
        usable.distance_correlation(x, z[:10])
