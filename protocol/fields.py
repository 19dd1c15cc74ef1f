"""A frame's fields: the ``Frame`` value, and the one rule for each field.

Every rule is written once and used twice: by ``Frame`` when a program builds a frame, and by
the decoder (``protocol.frame.decode_frame``) for a frame off the wire, so the two cannot drift
apart and an encoder cannot produce a frame its decoder refuses.  The bytes themselves (the
prefix, the MessagePack header, the tensor bytes) are ``protocol.frame``'s: the codec is there,
in one file.
"""
from __future__ import annotations

import dataclasses
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from protocol import signing
from protocol.errors import FrameError, Reason, TopicError
from protocol.topics import check_id

__all__ = ["Frame", "frame_from_checked", "now_us", "FEATURES", "RESULT", "KINDS", "DTYPE_CODES", "DTYPES",
           "ENCODING_CODES", "MAX_NDIM", "MAX_DIM", "MAX_ERROR_CHARS", "BUNDLE_ID_CHARS", "U64_MAX", "LABEL_MAX"]

FEATURES = "features"
RESULT = "result"
KINDS = (FEATURES, RESULT)
_KIND_TAG = {FEATURES: 1, RESULT: 2}

# dtype code on the wire -> numpy dtype name.  Codes are never reused.
DTYPE_CODES = {1: "int8", 2: "uint8", 3: "int16", 4: "float16", 5: "float32"}
DTYPE_CODE = {name: code for code, name in DTYPE_CODES.items()}
DTYPES = tuple(DTYPE_CODES.values())
ENCODING_CODES = {0: "raw", 1: "zstd"}
ENCODING_CODE = {name: code for code, name in ENCODING_CODES.items()}

MAX_NDIM = 8
MAX_DIM = 2**32 - 1
MAX_ERROR_CHARS = 512
BUNDLE_ID_CHARS = 16
U64_MAX = 2**64 - 1
LABEL_MAX = 2**31 - 1


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch (the frame's timestamp unit)."""
    return time.time_ns() // 1000


# --------------------------------------------------------------------------- dtype table

class WireDType:
    """What the codec needs to know about one wire dtype, looked up once."""

    __slots__ = ("code", "name", "le", "itemsize", "is_float", "zp_lo", "zp_hi")

    def __init__(self, code: int, name: str):
        dt = np.dtype(name)
        self.code = code
        self.name = name
        self.le = dt.newbyteorder("<")  # the wire's byte order, whatever the host's
        self.itemsize = dt.itemsize
        self.is_float = dt.kind == "f"
        info = None if self.is_float else np.iinfo(dt)
        self.zp_lo = None if info is None else int(info.min)
        self.zp_hi = None if info is None else int(info.max)


DTYPE_BY_CODE = {code: WireDType(code, name) for code, name in DTYPE_CODES.items()}
# numpy's type number is a C attribute (fast); dtype.name is computed in Python
# (tens of microseconds).  A big-endian float32 has float32's number too.
DTYPE_BY_NUM = {np.dtype(info.name).num: info for info in DTYPE_BY_CODE.values()}
_FLOAT64_NUM = np.dtype(np.float64).num
# byte orders whose bytes are not little-endian on this host
_NOT_LE = (">",) if sys.byteorder == "little" else (">", "=")


# --------------------------------------------------------------------------- field checks
# One definition of each rule, used both by Frame (a program building a frame)
# and by decode_frame (a frame off the wire), so the two cannot drift apart.

CACHE_MAX = 4096  # ids are few per deployment; a flood of new ones just empties the cache
_valid_device_ids: set[str] = set()
_bundle_ids: dict[str, str] = {}  # as given -> lower case
_valid_scales: dict[float, float] = {}  # as given -> float32-rounded
_HEX = frozenset("0123456789abcdefABCDEF")
_F32 = struct.Struct("<f")


def _as_int(value: object, what: str, lo: int = 0, hi: int = U64_MAX) -> int:
    if type(value) is int and lo <= value <= hi:  # the common case, without isinstance chains
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FrameError(Reason.BAD_FIELD, f"{what} must be an int, got {type(value).__name__}",
                         fix=f"pass {what} as an int")
    value = int(value)
    if not lo <= value <= hi:
        raise FrameError(Reason.BAD_FIELD, f"{what} {value} is outside [{lo}, {hi}]",
                         fix=f"use a {what} in that range")
    return value


def check_device_id(value: object, where: str = "") -> None:
    if type(value) is str and value in _valid_device_ids:
        return
    try:
        check_id(value, "device id")
    except TopicError as e:
        raise FrameError(Reason.BAD_DEVICE_ID, where + e.message, fix=e.fix) from None
    if type(value) is str:  # a str subclass could hash or compare oddly: never cached
        if len(_valid_device_ids) >= CACHE_MAX:
            _valid_device_ids.clear()
        _valid_device_ids.add(value)


def _bundle_id(value: object) -> str:
    """The bundle id in lower case, or FrameError."""
    if type(value) is str:
        known = _bundle_ids.get(value)
        if known is not None:
            return known
    if not (isinstance(value, str) and len(value) == BUNDLE_ID_CHARS and _HEX.issuperset(value)):
        raise FrameError(Reason.BAD_BUNDLE_ID, f"bundle id {value!r} is not {BUNDLE_ID_CHARS} hex characters",
                         fix="use the bundle's id from its manifest (bundle.bundle_id)")
    low = value.lower()
    if type(value) is str:
        if len(_bundle_ids) >= CACHE_MAX:
            _bundle_ids.clear()
        _bundle_ids[value] = low
    return low


def _as_tensor(value: object) -> tuple[np.ndarray, WireDType]:
    """``value`` as a read-only little-endian C-order array of a wire dtype, and that dtype."""
    if type(value) is np.ndarray:
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise FrameError(Reason.BAD_TENSOR, f"tensor is not an array: {e}", fix="pass a numpy array") from None
    dt = arr.dtype
    info = DTYPE_BY_NUM.get(dt.num)
    if info is None:
        raise FrameError(Reason.BAD_DTYPE, f"tensor dtype {dt} is not allowed on the wire",
                         fix=f"convert it to one of {', '.join(DTYPES)}")
    shape = arr.shape
    if len(shape) > MAX_NDIM:
        raise FrameError(Reason.BAD_SHAPE, f"tensor has {len(shape)} dimensions, the limit is {MAX_NDIM}",
                         fix="reshape it to at most 8 dimensions")
    for d in shape:
        if d > MAX_DIM:
            raise FrameError(Reason.BAD_SHAPE, f"tensor dimension too large in shape {shape}", fix="split the tensor")
    flags = arr.flags
    if dt.byteorder in _NOT_LE or not flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=info.le)
        flags = arr.flags
    if flags.writeable:
        arr = arr.view()
        arr.setflags(write=False)  # the frame is frozen; so is its view of the tensor
    return arr, info


def _float32_scale(scale: float) -> float:
    """``scale`` rounded to float32 (the wire carries float32, as TFLite does); inf beyond its range."""
    if not math.isfinite(scale):
        return scale
    try:  # a C cast: rounds exactly as numpy's float64 -> float32 does
        return _F32.unpack(_F32.pack(scale))[0]
    except OverflowError:
        return math.inf


def check_quantization(scale: object, zero_point: object, info: WireDType) -> tuple[float | None, int | None]:
    """Normalised (scale, zero_point): both None, or a float32-exact scale > 0 and an in-range zero point."""
    if scale is None and zero_point is None:
        return None, None
    if scale is None or zero_point is None:
        raise FrameError(Reason.BAD_QUANTIZATION, "scale and zero_point come together",
                         fix="give both (an int8 tensor's quantization) or neither")
    if info.is_float:
        raise FrameError(Reason.BAD_QUANTIZATION, f"a {info.name} tensor cannot carry quantization",
                         fix="drop scale/zero_point or send the integer tensor")
    known = _valid_scales.get(scale) if type(scale) is float else None  # a bundle has one scale
    if known is not None:
        scale = known
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise FrameError(Reason.BAD_QUANTIZATION, f"scale must be a number, got {type(scale).__name__}",
                             fix="use the feature spec's scale from the manifest")
        given = float(scale)
        scale = _float32_scale(given)
        if not (math.isfinite(scale) and scale > 0):
            raise FrameError(Reason.BAD_QUANTIZATION, f"scale {scale!r} must be finite and > 0",
                             fix="use the feature spec's scale from the manifest")
        if len(_valid_scales) >= CACHE_MAX:
            _valid_scales.clear()
        _valid_scales[given] = scale
    if type(zero_point) is int and info.zp_lo <= zero_point <= info.zp_hi:
        return scale, zero_point
    return scale, _as_int(zero_point, "zero_point", info.zp_lo, info.zp_hi)


def check_result(t_recv_us: object, t_done_us: object, label: object, error: object,
                  shape: tuple[int, ...] | list[int]) -> tuple[int, int, int | None]:
    """Normalised (t_recv_us, t_done_us, label) of a result frame, or FrameError."""
    if t_recv_us is None:
        raise FrameError(Reason.BAD_FIELD, "a result frame needs t_recv_us", fix="use Frame.result(request, ...)")
    t_recv_us = _as_int(t_recv_us, "t_recv_us")
    if t_done_us is None:
        raise FrameError(Reason.BAD_FIELD, "a result frame needs t_done_us", fix="use Frame.result(request, ...)")
    t_done_us = _as_int(t_done_us, "t_done_us")
    if error is not None:
        if not isinstance(error, str) or len(error) > MAX_ERROR_CHARS:
            raise FrameError(Reason.BAD_FIELD, f"error must be a str of at most {MAX_ERROR_CHARS} characters",
                             fix="shorten it (Frame.error_result truncates for you)")
    elif label is None:
        raise FrameError(Reason.BAD_LABEL, "a result frame needs a label (or an error)",
                         fix="pass label=, or error= for a request that could not be served")
    if label is not None:
        hi = shape[-1] - 1 if shape and shape[-1] else LABEL_MAX
        label = _as_int(label, "label", 0, hi)
    return t_recv_us, t_done_us, label


# --------------------------------------------------------------------------- the Frame

@dataclass(frozen=True, eq=False, init=False)
class Frame:
    """One feature tensor (device -> cloud) or one result (cloud -> device).

    Validates itself on construction and raises FrameError.  ``tensor`` is kept
    as a read-only little-endian C-order array.  Build one with
    ``Frame.features(...)`` or ``Frame.result(request, ...)``.  ``mac`` and
    ``encoding`` describe how a decoded frame travelled; ``encode_frame``
    ignores them (it signs when given a key and picks the encoding itself).
    """

    kind: str
    request_id: int
    device_id: str
    bundle_id: str
    seq: int
    t_send_us: int
    tensor: np.ndarray
    scale: Optional[float] = None
    zero_point: Optional[int] = None
    t_recv_us: Optional[int] = None
    t_done_us: Optional[int] = None
    label: Optional[int] = None
    error: Optional[str] = None
    mac: Optional[bytes] = field(default=None, repr=False, compare=False)
    encoding: str = field(default="raw", repr=False, compare=False)

    # Written by hand (the dataclass one sets 15 frozen attributes one by one,
    # then validates): checks every field, then stores them in one go.
    def __init__(self, kind: str, request_id: int, device_id: str, bundle_id: str, seq: int, t_send_us: int,
                 tensor: np.ndarray, scale: Optional[float] = None, zero_point: Optional[int] = None,
                 t_recv_us: Optional[int] = None, t_done_us: Optional[int] = None, label: Optional[int] = None,
                 error: Optional[str] = None, mac: Optional[bytes] = None, encoding: str = "raw") -> None:
        if not isinstance(kind, str) or kind not in _KIND_TAG:
            raise FrameError(Reason.BAD_KIND, f"frame kind {kind!r} is unknown", fix=f"use one of {', '.join(KINDS)}")
        request_id = _as_int(request_id, "request_id")
        seq = _as_int(seq, "seq")
        t_send_us = _as_int(t_send_us, "t_send_us")
        check_device_id(device_id)
        bundle_id = _bundle_id(bundle_id)
        tensor, info = _as_tensor(tensor)
        scale, zero_point = check_quantization(scale, zero_point, info)
        if kind == FEATURES:
            if t_recv_us is not None or t_done_us is not None or label is not None or error is not None:
                extra = [n for n, v in (("t_recv_us", t_recv_us), ("t_done_us", t_done_us), ("label", label),
                                        ("error", error)) if v is not None]
                raise FrameError(Reason.BAD_FIELD, f"a features frame cannot carry {', '.join(extra)}",
                                 fix="those fields belong to result frames (Frame.result)")
        else:
            t_recv_us, t_done_us, label = check_result(t_recv_us, t_done_us, label, error, tensor.shape)
        if mac is not None and (not isinstance(mac, bytes) or len(mac) != signing.MAC_BYTES):
            raise FrameError(Reason.BAD_MAC, f"mac must be {signing.MAC_BYTES} bytes",
                             fix="leave mac unset; encode_frame signs")
        if not isinstance(encoding, str) or encoding not in ENCODING_CODE:
            raise FrameError(Reason.BAD_ENCODING, f"encoding {encoding!r} is unknown", fix="use 'raw' or 'zstd'")
        self.__dict__.update(kind=kind, request_id=request_id, device_id=device_id, bundle_id=bundle_id, seq=seq,
                             t_send_us=t_send_us, tensor=tensor, scale=scale, zero_point=zero_point,
                             t_recv_us=t_recv_us, t_done_us=t_done_us, label=label, error=error, mac=mac,
                             encoding=encoding)

    # ---- constructors a consumer wants

    @classmethod
    def features(cls, tensor, *, request_id: int, device_id: str, bundle_id: str, seq: int,
                 scale: float | None = None, zero_point: int | None = None,
                 t_send_us: int | None = None) -> "Frame":
        """A device's feature frame; ``t_send_us`` defaults to now."""
        return cls(FEATURES, request_id, device_id, bundle_id, seq, now_us() if t_send_us is None else t_send_us,
                   tensor, scale, zero_point)

    @classmethod
    def result(cls, request: "Frame", probabilities, *, t_recv_us: int, t_done_us: int | None = None,
               label: int | None = None) -> "Frame":
        """The answer to ``request``: echoes its ids, seq and send time; label defaults to the top-1."""
        probs = np.asarray(probabilities)
        if probs.dtype.num == _FLOAT64_NUM:
            probs = probs.astype(np.float32)  # what a tail usually returns after numpy arithmetic
        if label is None and probs.size:
            label = int(probs.reshape(-1, probs.shape[-1])[0].argmax()) if probs.ndim else 0
        return cls(RESULT, request.request_id, request.device_id, request.bundle_id, request.seq,
                   request.t_send_us, probs, t_recv_us=t_recv_us,
                   t_done_us=now_us() if t_done_us is None else t_done_us, label=label)

    @classmethod
    def error_result(cls, request: "Frame", error: str, *, t_recv_us: int, t_done_us: int | None = None) -> "Frame":
        """A result saying the worker could not serve ``request`` (empty float32 tensor, no label)."""
        text = str(error)
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS - 1] + "…"
        return cls(RESULT, request.request_id, request.device_id, request.bundle_id, request.seq,
                   request.t_send_us, np.zeros((0,), np.float32), t_recv_us=t_recv_us,
                   t_done_us=now_us() if t_done_us is None else t_done_us, error=text)

    # ---- conveniences

    @property
    def dtype(self) -> str:
        """The tensor's dtype name (``"int8"``...), from the codec's table rather than numpy's slow ``.name``."""
        info = DTYPE_BY_NUM.get(self.tensor.dtype.num)
        return self.tensor.dtype.name if info is None else info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def ok(self) -> bool:
        """False for a result that carries an error."""
        return self.error is None

    def dequantized(self) -> np.ndarray:
        """The tensor as float32: ``(q - zero_point) * scale`` when quantized, else a float32 copy."""
        if self.scale is None:
            return self.tensor.astype(np.float32)
        return ((self.tensor.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale))

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.repr and f.name != "tensor" and (f.name in ("kind", "request_id", "device_id", "bundle_id",
                                                                    "seq", "t_send_us")
                                                       or getattr(self, f.name) is not None)]
        parts.insert(6, f"tensor={self.dtype}{list(self.shape)}")
        return f"Frame({', '.join(parts)})"

    def replace(self, **changes) -> "Frame":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        same = all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.compare and f.name != "tensor")
        return (same and self.tensor.dtype == other.tensor.dtype and self.tensor.shape == other.tensor.shape
                and self.tensor.tobytes() == other.tensor.tobytes())

    __hash__ = None  # type: ignore[assignment]  # holds an array


def frame_from_checked(fields: dict) -> Frame:
    """A Frame from fields that are already valid and normalised (the decoder's checks); no second pass.

    For ``protocol.frame.decode_frame`` only: it has applied every rule ``Frame.__init__`` applies.
    """
    frame = object.__new__(Frame)
    frame.__dict__.update(fields)
    return frame
