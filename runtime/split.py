"""A bundle's head and tail as every role runs them: ``Head`` (input -> tensors exactly as sent)
and ``Tail`` (wire tensors -> the answer).

The project's claim is that the auditor attacks exactly what a device sends and that parity
checks exactly what a device runs.  That holds by construction because the device agent, the
device profile, the cloud registry, the converter's parity check, the auditor, the demo and
the benchmarks all get their tensors from here: one place checks a head against its manifest,
one place turns its output into the tensor on the wire, one place feeds wire tensors to a tail.
"""
from __future__ import annotations

import math

import numpy as np

from protocol.errors import BundleError
from protocol.manifest import Bundle, FeatureSpec
from runtime.interpreter import Backend, Model


def _rebuild(bundle: Bundle) -> str:
    return f"rebuild the bundle: {bundle.manifest.convert_command()}"


def _same_quantization(scale: float, zero_point: int, spec: FeatureSpec) -> bool:
    return math.isclose(scale, spec.scale, rel_tol=1e-6) and zero_point == spec.zero_point


class Head:
    """A bundle's ``head.tflite``, checked once against the manifest when it is loaded.

    ``features(x)`` runs a batch of head inputs (N, H, W, C) and returns the feature tensors
    (N, *feature.shape) in the manifest's dtype: the bytes a device puts in its frames.
    ``model`` is the interpreter underneath (for timing, or its backend).
    """

    def __init__(self, bundle: Bundle, *, num_threads: int | None = None,
                 backend: str | Backend | None = None):
        self.bundle = bundle
        self.spec: FeatureSpec = bundle.manifest.feature
        defence = bundle.manifest.defence
        #: what the device does to the head's output before sending it (None: nothing)
        self.defence = defence if defence is not None and defence.on_device else None
        # one generator seeded from the OS's entropy: every input draws fresh noise or a fresh mask
        self._rng = np.random.default_rng()
        self.model = Model(bundle.head_path, num_threads=num_threads, backend=backend)
        self._check()

    @property
    def backend(self) -> Backend:
        return self.model.backend

    def _check(self) -> None:
        manifest, spec, out = self.bundle.manifest, self.spec, self.model.output
        if tuple(self.model.sample_shape) != tuple(manifest.input.shape):
            raise BundleError(f"head.tflite takes input {list(self.model.sample_shape)} but the manifest says "
                              f"{list(manifest.input.shape)}", fix=_rebuild(self.bundle))
        if int(np.prod(out.shape[1:])) != spec.elements:
            raise BundleError(f"head.tflite outputs {list(out.shape[1:])} but the manifest's feature is "
                              f"{list(spec.shape)}", fix=_rebuild(self.bundle))
        if self.defence is not None and out.quantized:
            d = self.defence   # the head's own output is declared in the defence; the wire is the feature
            if not (math.isclose(out.scale, d.head_scale, rel_tol=1e-6) and out.zero_point == d.head_zero_point):
                raise BundleError(f"head.tflite's output quantization (scale {out.scale}, zero point {out.zero_point}) "
                                  f"is not the one the manifest's defence ({d.describe()}) was declared for "
                                  f"(scale {d.head_scale}, zero point {d.head_zero_point}): the head and the "
                                  f"manifest come from different bundles", fix=_rebuild(self.bundle))
        elif spec.quantized and out.quantized and (out.dtype.name != spec.dtype
                                                   or not _same_quantization(out.scale, out.zero_point, spec)):
            lost = " (a hardened bundle whose manifest lost its `defence` block looks like this: the device " \
                   "would send clean features)" if out.dtype.name == spec.dtype else ""
            raise BundleError(f"head.tflite's output quantization ({out.dtype.name}, scale {out.scale}, zero point "
                              f"{out.zero_point}) differs from the manifest's ({spec.dtype}, {spec.scale}, "
                              f"{spec.zero_point}){lost}", fix=_rebuild(self.bundle))
        if not spec.quantized and out.quantized:
            raise BundleError(f"head.tflite outputs quantized {out.dtype.name} but the manifest's feature is "
                              f"{spec.dtype}", fix=_rebuild(self.bundle))

    def features(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Head inputs (N, H, W, C) -> the feature tensors exactly as sent, (N, *feature.shape).

        A declared defence (``protocol.defence``) is applied here, fresh for every input; ``rng``
        replaces the head's own entropy-seeded generator only to reproduce draws (parity).
        """
        y = self.model.run(x)
        y = y.reshape((y.shape[0],) + tuple(self.spec.shape))
        if self.defence is not None:
            return self.defence.send(y, self.spec, rng if rng is not None else self._rng)
        if y.dtype == np.dtype(self.spec.dtype):
            return y        # what the interpreter computed, untouched: the usual case
        # A float head whose manifest says the wire is quantized (or float16): convert as the
        # manifest says, with the one quantizer (protocol.tensors).
        return self.spec.quantize(y)


class Tail:
    """A bundle's ``tail.tflite``; ``run(features)`` takes feature tensors as they arrive on the wire.

    The wire tensors (N, *feature.shape) in the manifest's dtype go to the tail as they are
    when it takes them so, dequantized with the manifest's scale and zero point otherwise;
    the answer is float32 (N, *output.shape).
    """

    def __init__(self, bundle: Bundle, *, num_threads: int | None = None,
                 backend: str | Backend | None = None):
        self.bundle = bundle
        self.spec: FeatureSpec = bundle.manifest.feature
        self.model = Model(bundle.tail_path, num_threads=num_threads, backend=backend)
        if tuple(self.model.input.shape[1:]) != tuple(self.spec.shape):
            raise BundleError(f"bundle {bundle.bundle_id}: tail.tflite takes {list(self.model.input.shape[1:])} but "
                              f"the manifest's feature is {list(self.spec.shape)}", fix=_rebuild(bundle))
        t = self.model.input
        #: the tail takes the wire tensor as is (same dtype and quantization)
        self.pass_through = (np.dtype(self.spec.dtype) == t.dtype
                             and (not self.spec.quantized or _same_quantization(t.scale, t.zero_point, self.spec)))

    @property
    def backend(self) -> Backend:
        return self.model.backend

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """Wire tensors (N, *feature.shape) -> the tail's input batch."""
        x = self.spec.check(np.asarray(features))
        return x if self.pass_through else self.spec.dequantize(x)

    def run(self, features: np.ndarray) -> np.ndarray:
        """Wire tensors (N, *feature.shape) -> the tail's answer, float32 (N, *output.shape)."""
        return self.model.run_float(self.inputs(features))

