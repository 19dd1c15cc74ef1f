"""The defence a manifest declares (protocol.defence): what it accepts, and what applying it does."""
from __future__ import annotations

import json

import numpy as np
import pytest

from protocol import tensors
from protocol.defence import DefenceSpec, parse_defence
from protocol.errors import BundleError
from protocol.manifest import FeatureSpec, parse_manifest


def noise(**kw):
    d = dict(method="noise", strength=1.0, op="noise", distribution="gaussian", scale=[0.5],
             head_scale=0.05, head_zero_point=-128)
    d.update(kw)
    return DefenceSpec(**d)


def test_noise_is_fresh_per_call_and_has_the_declared_spread():
    spec = noise(scale=[0.5, 2.0])                 # one standard deviation per channel
    x = np.zeros((4000, 2), np.float32)
    a, b = spec.apply(x), spec.apply(x)
    assert not np.array_equal(a, b)                # two sendings of the same input differ
    np.testing.assert_allclose(a.std(axis=0), [0.5, 2.0], rtol=0.05)


def test_one_scale_per_element_applies_element_by_element():
    scale = [0.0, 1.0, 0.0, 3.0, 0.0, 0.0]                 # a (2, 3) tensor: two noisy elements
    got = noise(scale=scale).apply(np.zeros((5000, 2, 3), np.float32))
    np.testing.assert_allclose(got.std(axis=0).ravel(), scale, atol=0.1)
    with pytest.raises(ValueError, match="6 noise scales"):
        noise(scale=scale).apply(np.zeros((4, 5), np.float32))


def test_laplace_noise_has_the_declared_standard_deviation():
    spec = noise(distribution="laplace", scale=[1.5])
    got = spec.apply(np.zeros((20000, 1), np.float32))
    assert abs(got.std() - 1.5) < 0.05
    assert np.mean(np.abs(got)) == pytest.approx(1.5 / np.sqrt(2), rel=0.05)   # Laplace: E|x| = b


def test_a_seeded_generator_reproduces_the_draws():
    spec = noise()
    x = np.ones((8, 3, 3, 1), np.float32)
    a = spec.apply(x, np.random.default_rng(3))
    b = spec.apply(x, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_dropout_drops_the_declared_share_and_scales_the_rest():
    spec = DefenceSpec(method="dropout", strength=0.3, op="dropout", rate=0.3, head_scale=0.1, head_zero_point=0)
    x = np.ones((200, 50), np.float32)
    y = spec.apply(x)
    assert abs(np.mean(y == 0) - 0.3) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)


def test_send_dequantizes_the_head_applies_and_quantizes_for_the_wire():
    feature = FeatureSpec(shape=(4,), dtype="int8", scale=0.2, zero_point=0)
    spec = noise(scale=[1e-9], head_scale=0.1, head_zero_point=-10)       # (almost) no noise: exact arithmetic
    raw = np.array([[-10, 0, 10, 30]], np.int8)                            # 0.0, 1.0, 2.0, 4.0 at the head's scale
    sent = spec.send(raw, feature, np.random.default_rng(0))
    np.testing.assert_array_equal(sent, tensors.quantize(np.array([[0.0, 1.0, 2.0, 4.0]]), 0.2, 0))


def test_weights_only_defences_send_the_head_output_untouched():
    spec = DefenceSpec(method="nopeek", strength=1.0, op="none")
    raw = np.arange(6, dtype=np.int8).reshape(1, 6)
    assert spec.send(raw, FeatureSpec(shape=(6,), dtype="int8", scale=1.0, zero_point=0)) is raw
    assert not spec.on_device


@pytest.mark.parametrize("bad", [
    dict(op="noise", distribution=None),                  # noise needs a distribution
    dict(op="noise", scale=[]),                           # ... and a scale
    dict(op="noise", scale=[-1.0]),
    dict(op="dropout", distribution=None, scale=None),    # dropout needs a rate
    dict(op="none", rate=0.5, distribution=None, scale=None),
    dict(strength=float("nan")),
    dict(head_scale=None),                                # both or neither
])
def test_inconsistent_declarations_are_refused(bad):
    with pytest.raises(ValueError):
        noise(**bad)


def test_unknown_keys_and_methods_are_refused():
    with pytest.raises(ValueError, match="unknown|Object contains"):
        parse_defence(dict(noise().to_dict(), extra=1))
    with pytest.raises(ValueError):
        parse_defence(dict(noise().to_dict(), method="jpeg"))


# ------------------------------------------------------------------ the manifest

def manifest(**extra):
    m = {"schema_version": 1, "bundle_id": "0" * 16, "model": "m", "cut": "pool2", "quant": "int8",
         "input": {"shape": [28, 28, 1], "dtype": "float32",
                   "preprocess": {"color_mode": "L", "resize": [28, 28]}},
         "feature": {"shape": [7, 7, 4], "dtype": "int8", "scale": 0.1, "zero_point": -128},
         "output": {"shape": [10], "dtype": "float32", "kind": "probabilities"},
         "labels": [], "files": {}, "tools": {}}
    m.update(extra)
    return m


def test_a_manifest_without_a_defence_still_reads():
    assert parse_manifest(manifest()).defence is None


def test_a_declared_defence_round_trips_and_names_the_command_that_makes_it():
    m = parse_manifest(json.loads(json.dumps(manifest(defence=noise().to_dict()))))
    assert m.defence == noise()
    assert m.convert_command().startswith("edgesplit harden m --cut pool2 --method noise --strength 1")


def test_an_int8_bundle_with_a_device_defence_must_say_how_the_head_quantizes():
    with pytest.raises(BundleError, match="head_scale"):
        parse_manifest(manifest(defence=noise(head_scale=None, head_zero_point=None).to_dict()))
