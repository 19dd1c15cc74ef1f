"""The tensors the attacker sees: what the device really sends, and the float features beside it.

``sent_features`` runs a bundle's head as a device does (``runtime.split.Head``: the real
LiteRT interpreter, the tensors exactly as sent), puts every one in a real wire frame
(``protocol.frame.encode_frame``), decodes it as the cloud does (``decode_frame``) and
dequantizes it with the manifest's scale and zero point (``protocol.tensors.dequantize``).
``float_features`` is the unquantized Keras output of the same layer, for comparison (and
for the paper, which used it).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class SentFeatures:
    """Features of N images as the cloud receives them."""

    cut: str
    values: np.ndarray        # float32 (N, *shape): dequantized with the manifest's parameters
    raw: np.ndarray           # int8 (N, *shape): the tensor on the wire
    scale: float
    zero_point: int
    frame_bytes: float        # mean size of one encoded frame (header + tensor), in bytes
    seconds: float            # wall time to run the head and the wire round trip

    def __len__(self) -> int:
        return len(self.values)


def float_features(model, cut: str, x, batch_size: int = 500) -> np.ndarray:
    """Output of layer ``cut`` of the Keras ``model`` on images ``x`` (float32, unquantized)."""
    from auditor.invert import head_of

    head = head_of(model, cut)
    return np.asarray(head.predict(np.asarray(x, np.float32), batch_size=batch_size, verbose=0), np.float32)


def sent_features(bundle, x, *, device_id: str = "auditor", head=None, progress: bool = False,
                  batch_size: int = 256) -> SentFeatures:
    """Run ``bundle``'s head on images ``x`` and pass every output through the wire.

    ``head`` may be a ready ``runtime.split.Head`` of the bundle (saves a reload).
    One frame per image, as a device sends them; each is decoded and dequantized with the
    manifest's feature spec as a cloud worker does.
    """
    from tqdm.auto import tqdm

    from protocol.errors import BundleError
    from protocol.frame import Frame, decode_frame, encode_frame
    from runtime.split import Head

    spec = bundle.feature
    cut, shape = bundle.manifest.cut, tuple(int(d) for d in spec.shape)
    scale = float(spec.scale) if spec.quantized else None
    zero_point = int(spec.zero_point) if spec.quantized else None
    head = head or Head(bundle)      # checked against the manifest once, as on a device
    x = np.asarray(x, np.float32)
    n = len(x)
    values = np.empty((n,) + shape, np.float32)
    raw = np.empty((n,) + shape, np.dtype(spec.dtype))
    total_bytes = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"head+wire {cut}", unit="img", disable=not progress, leave=False)
    for s in range(0, n, batch_size):
        out = head.features(x[s:s + batch_size])
        for j, q in enumerate(out):
            i = s + j
            frame = Frame.features(q, request_id=i, device_id=device_id,
                                   bundle_id=bundle.bundle_id, seq=i, scale=scale, zero_point=zero_point)
            payload = encode_frame(frame)
            total_bytes += len(payload)
            got = decode_frame(payload)
            if got.bundle_id != bundle.bundle_id or got.shape != shape:
                raise BundleError(f"frame {i} came back as bundle {got.bundle_id} shape {got.shape}",
                                  fix="report this: the wire round trip changed a frame")
            raw[i] = got.tensor
            values[i] = spec.dequantize(got.tensor)
        bar.update(len(out))
    bar.close()
    return SentFeatures(cut=cut, values=values, raw=raw, scale=scale or 0.0, zero_point=zero_point or 0,
                        frame_bytes=total_bytes / max(n, 1), seconds=time.perf_counter() - t0)


def measure_latency_ms(model, sample, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time of one single-sample ``run`` of a ``runtime.interpreter.Model``, in ms."""
    sample = np.asarray(sample)[:1]
    for _ in range(warmup):
        model.run(sample)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(sample)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def file_size(path) -> int:
    return int(os.path.getsize(path))
