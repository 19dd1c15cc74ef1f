"""runtime.split: a bundle's head gives the tensors exactly as sent, its tail takes them as received."""
from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest

from protocol.errors import BundleError
from runtime.interpreter import Model
from runtime.split import Head, Tail


def with_manifest(bundle, **changes):
    """The same files under a manifest that says something else (as a hand-edited bundle would)."""
    m = bundle.manifest
    return dataclasses.replace(bundle, manifest=msgspec.structs.replace(m, **changes))


def test_features_are_the_interpreters_int8_output_shaped_as_the_manifest_says(tiny_bundle):
    x = np.random.default_rng(0).random((5, *tiny_bundle.manifest.input.shape), dtype=np.float32)
    head = Head(tiny_bundle, num_threads=1)
    got = head.features(x)
    spec = tiny_bundle.feature
    assert got.dtype == np.int8 and got.shape == (5, *spec.shape)
    raw = Model(tiny_bundle.head_path).run(x)
    assert got.tobytes() == raw.tobytes()        # untouched: no second quantization in Python
    assert head.backend.name == "ai_edge_litert"


def test_tail_takes_wire_tensors_and_dequantizes_them_with_the_manifest(tiny_bundle):
    x = np.random.default_rng(1).random((6, *tiny_bundle.manifest.input.shape), dtype=np.float32)
    feats = Head(tiny_bundle).features(x)
    tail = Tail(tiny_bundle)
    assert not tail.pass_through                 # the converter's tails take float32
    probs = tail.run(feats)
    assert probs.dtype == np.float32 and probs.shape == (6, *tiny_bundle.manifest.output.shape)
    want = Model(tiny_bundle.tail_path).run_float(tiny_bundle.feature.dequantize(feats))
    np.testing.assert_array_equal(probs, want)
    with pytest.raises(ValueError, match="dtype is float32"):
        tail.run(feats.astype(np.float32))       # a float copy is not what the wire carries


def test_a_head_that_does_not_fit_its_manifest_is_refused_once_at_load(tiny_bundle):
    spec = tiny_bundle.feature
    other_scale = with_manifest(tiny_bundle, feature=msgspec.structs.replace(spec, scale=spec.scale * 2))
    with pytest.raises(BundleError, match="output quantization") as e:
        Head(other_scale)
    assert "edgesplit convert" in e.value.fix
    other_shape = with_manifest(tiny_bundle, feature=msgspec.structs.replace(spec, shape=(7, 7, 4)))
    with pytest.raises(BundleError, match="manifest's feature is"):
        Head(other_shape)
    with pytest.raises(BundleError, match="tail.tflite takes"):
        Tail(other_shape)
    m_in = tiny_bundle.manifest.input
    other_input = with_manifest(tiny_bundle, input=msgspec.structs.replace(
        m_in, shape=(32, 32, 1), preprocess=msgspec.structs.replace(m_in.preprocess, resize=(32, 32))))
    with pytest.raises(BundleError, match="head.tflite takes input"):
        Head(other_input)
    as_float = with_manifest(tiny_bundle, quant="float32", calibration=None,
                             feature=msgspec.structs.replace(spec, dtype="float32", scale=None, zero_point=None))
    with pytest.raises(BundleError, match="outputs quantized int8"):
        Head(as_float)
