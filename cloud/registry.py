"""The bundles a worker serves, by bundle id, each with its tail interpreter.

A frame names its bundle; the registry says whether this worker can answer it
and turns the frame's tensor into the tail's input.  Checks that are about the
frame (kind, shape, dtype, quantization) raise ``FrameError`` with a short
``reason`` so the worker can dead-letter it; problems with the bundle itself
are found when it is loaded (``BundleError``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Iterable

import numpy as np

from protocol.errors import BundleError, FrameError, Reason
from protocol.frame import Frame
from protocol.manifest import Bundle, FeatureSpec, load_bundle
from runtime.split import Tail

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Served:
    """One bundle with its loaded tail."""

    bundle: Bundle
    tail: Tail
    last_used: float = dataclasses.field(default_factory=time.monotonic)   # a frame named it (monotonic)

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def feature(self) -> FeatureSpec:
        return self.bundle.manifest.feature

    def check(self, frame: Frame) -> np.ndarray:
        """The frame's tensor shaped like the feature spec, or FrameError saying what does not fit."""
        spec = self.feature
        if frame.kind != "features":
            raise FrameError(Reason.WRONG_KIND, f"a {frame.kind} frame arrived on a features topic",
                             fix="publish results on the results topic, features on the features topic")
        if frame.dtype != spec.dtype:
            raise FrameError(Reason.BAD_DTYPE,
                             f"feature dtype is {frame.dtype}, bundle {self.bundle_id} expects {spec.dtype}",
                             fix="run the head of the same bundle on the device")
        shape = tuple(frame.shape)
        if shape != tuple(spec.shape) and shape != (1, *spec.shape):
            raise FrameError(Reason.BAD_SHAPE, f"feature shape is {list(shape)}, bundle {self.bundle_id} expects "
                                               f"{list(spec.shape)}",
                             fix="run the head of the same bundle on the device")
        if spec.quantized and frame.scale is not None:
            if not (math.isclose(frame.scale, spec.scale, rel_tol=1e-6) and frame.zero_point == spec.zero_point):
                raise FrameError(Reason.BAD_QUANTIZATION,
                                 f"feature quantization (scale {frame.scale}, zero point {frame.zero_point}) differs "
                                 f"from bundle {self.bundle_id}'s ({spec.scale}, {spec.zero_point})",
                                 fix="run the head of the same bundle on the device")
        return frame.tensor.reshape(spec.shape)

    def run(self, tensors: list[np.ndarray]) -> np.ndarray:
        """The tail's float32 output for a batch of checked feature tensors (one row per tensor)."""
        return self.tail.run(np.stack(tensors))


class Registry:
    """Bundles by id.  ``Registry.load(paths)`` loads and verifies each and opens its tail.

    Bundles come and go while frames are served (``cloud.updates`` loads announced ones and drops
    idle ones): the table is replaced, never changed in place, so a reader on the batch thread
    always sees a whole one.
    """

    def __init__(self, *, num_threads: int | None = None, backend: str | None = None):
        self._served: dict[str, Served] = {}
        self._num_threads = num_threads
        self._backend = backend

    @classmethod
    def load(cls, paths: Iterable[str | os.PathLike], *, num_threads: int | None = None,
             backend: str | None = None) -> "Registry":
        reg = cls(num_threads=num_threads, backend=backend)
        for p in paths:
            reg.add(load_bundle(p))
        if not reg._served:
            raise BundleError("no bundle to serve", fix="pass at least one --bundle DIR_OR_TAR_GZ")
        return reg

    def open_tail(self, bundle: Bundle) -> Tail:
        """``bundle``'s tail with this registry's interpreter settings, checked against its manifest."""
        return Tail(bundle, num_threads=self._num_threads, backend=self._backend)

    def add(self, bundle: Bundle, tail: Tail | None = None) -> Served:
        if bundle.bundle_id in self._served:
            log.warning("bundle %s given twice (%s); serving it once", bundle.bundle_id, bundle.source)
            return self._served[bundle.bundle_id]
        tail = tail if tail is not None else self.open_tail(bundle)
        spec = bundle.manifest.feature
        served = Served(bundle, tail)
        self._served = {**self._served, bundle.bundle_id: served}
        log.info("serving bundle %s (%s cut at %s, %s): feature %s %s, tail on %s", bundle.bundle_id,
                 bundle.manifest.model, bundle.manifest.cut, bundle.manifest.quant, spec.dtype,
                 list(spec.shape), tail.backend.name)
        return served

    def get(self, bundle_id: str) -> Served | None:
        return self._served.get(bundle_id)

    def remove(self, bundle_id: str) -> Served | None:
        """Stop serving a bundle (frames naming it are then ``unknown-bundle``); the one removed."""
        table = dict(self._served)
        gone = table.pop(bundle_id, None)
        self._served = table
        if gone is not None:
            log.info("no longer serving bundle %s", bundle_id)
        return gone

    def lookup(self, frame: Frame) -> Served:
        """The bundle a frame names, or FrameError (reason ``unknown-bundle``)."""
        served = self._served.get(frame.bundle_id)
        if served is None:
            raise FrameError(Reason.UNKNOWN_BUNDLE, f"bundle {frame.bundle_id} is not served here (serving "
                                                    f"{', '.join(self.ids) or 'nothing'})",
                             fix="start the cloud with --bundle for that bundle, or update the device's bundle")
        served.last_used = time.monotonic()
        return served

    @property
    def ids(self) -> list[str]:
        return list(self._served)

    def __len__(self) -> int:
        return len(self._served)

    def __contains__(self, bundle_id: object) -> bool:
        return bundle_id in self._served
