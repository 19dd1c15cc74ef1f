"""Quantize and dequantize feature tensors with a bundle's parameters.

One definition for every role: the device, the cloud and the auditor turn the
int8 tensor on the wire into floats (and back) with these functions and the
``scale`` / ``zero_point`` of the bundle's manifest, never by hand.

The arithmetic is TFLite's affine scheme, ``real = scale * (q - zero_point)``,
with rounding half away from zero when quantizing (as TFLite's QUANTIZE op).
"""
from __future__ import annotations

import os

import numpy as np

#: integer dtypes a quantized tensor may have, with their ranges
INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer tensor -> float32 tensor: ``scale * (q - zero_point)``."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":
        raise TypeError(f"dequantize expects an integer tensor, got dtype {q.dtype}")
    return ((q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale))


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str = "int8") -> np.ndarray:
    """Float tensor -> integer tensor: ``round(x / scale) + zero_point``, clipped to the dtype."""
    if dtype not in INT_RANGES:
        raise ValueError(f"quantize: dtype must be one of {sorted(INT_RANGES)}, got {dtype!r}")
    if not scale > 0:
        raise ValueError(f"quantize: scale must be > 0, got {scale!r}")
    lo, hi = INT_RANGES[dtype]
    v = np.asarray(x, dtype=np.float32) / np.float32(scale)
    # Half away from zero, as TFLite's reference QUANTIZE kernel (std::round); numpy's round is
    # half to even, and so are the optimized kernels the interpreters run by default (seen with
    # ai-edge-litert and tensorflow.lite on x86-64): a value exactly between two steps may differ
    # by one step from what an interpreter computes.  The heads edgesplit makes quantize inside
    # the interpreter (runtime.split.Head returns their output untouched), so no tensor a device
    # sends comes from here.
    r = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return np.clip(r + zero_point, lo, hi).astype(dtype)


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, and paths, as JSON values."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
