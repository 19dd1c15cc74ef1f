"""The wire frame: one MQTT payload per feature tensor or result.

Layout (docs/frame-format.md has every byte)::

    "ES" | version (1 byte) | header length (uint16 LE) | header (MessagePack array) | tensor bytes

Everything travels in the payload, so a frame is the same on MQTT 3.1.1 and 5.
The header is a positional msgspec Struct (small: about 60 bytes for an int8
pool2 tensor); the tensor bytes are raw little-endian C order, or one zstd
frame when that pays.  ``decode_frame`` bounds every length before it
allocates and raises only ``FrameError``, whose ``reason`` attribute is a
short code (``bad-magic``, ``bad-mac``, ...) for counters and dead letters.

This is the hot path of every device and worker (one encode and one decode per
inference on each side), so it avoids numpy's slow Python-level attributes
(``dtype.name``, ``np.iinfo``, ``np.errstate``) in favour of tables built at
import, and the decoder builds its Frame from fields it has already checked
(``Frame._trusted``) instead of validating them a second time.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Optional

import msgspec
import numpy as np
import zstandard

from protocol import signing
from protocol.errors import FrameError, TopicError, UsageError
from protocol.topics import check_id

log = logging.getLogger(__name__)

MAGIC = b"ES"
VERSION = 1
_PREFIX = struct.Struct("<2sBH")  # magic, version, header length
PREFIX_BYTES = _PREFIX.size       # 5

FEATURES = "features"
RESULT = "result"
KINDS = (FEATURES, RESULT)
_KIND_TAG = {FEATURES: 1, RESULT: 2}

# dtype code on the wire -> numpy dtype name.  Codes are never reused.
DTYPE_CODES = {1: "int8", 2: "uint8", 3: "int16", 4: "float16", 5: "float32"}
_DTYPE_CODE = {name: code for code, name in DTYPE_CODES.items()}
DTYPES = tuple(DTYPE_CODES.values())
ENCODING_CODES = {0: "raw", 1: "zstd"}
_ENCODING_CODE = {name: code for code, name in ENCODING_CODES.items()}

MAX_NDIM = 8
MAX_DIM = 2**32 - 1
MAX_ERROR_CHARS = 512
BUNDLE_ID_CHARS = 16
U64_MAX = 2**64 - 1
LABEL_MAX = 2**31 - 1

# compress="auto" uses zstd only on tensors of at least this size when it saves
# at least this fraction: below that, the CPU on a Pi costs more than the bytes.
AUTO_MIN_BYTES = 256
AUTO_MIN_SAVING = 0.10
ZSTD_LEVEL = 1   # on int8 feature maps level 1 is both faster (~25 %) and a little smaller than 3


@dataclass(frozen=True)
class FrameLimits:
    """Bounds the decoder enforces before it allocates anything."""

    max_payload_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 1024
    max_ndim: int = MAX_NDIM
    max_dim: int = 2**24
    max_tensor_bytes: int = 16 * 1024 * 1024  # after decompression

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"FrameLimits.{f.name} must be a positive int, got {v!r}",
                                 fix="use the defaults: FrameLimits()")
        if self.max_header_bytes > 0xFFFF or self.max_ndim > MAX_NDIM:
            raise UsageError(f"FrameLimits exceed the format: header <= 65535 bytes, ndim <= {MAX_NDIM}",
                             fix="lower max_header_bytes / max_ndim")


_DEFAULT_LIMITS = FrameLimits()


def _fail(reason: str, message: str, fix: str | None = None) -> FrameError:
    err = FrameError(message, fix=fix)
    err.reason = reason  # short code for counters and dead letters
    return err


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch (the frame's timestamp unit)."""
    return time.time_ns() // 1000


# --------------------------------------------------------------------------- dtype table

class _DType:
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


_DT_BY_CODE = {code: _DType(code, name) for code, name in DTYPE_CODES.items()}
# numpy's type number is a C attribute (fast); dtype.name is computed in Python
# (tens of microseconds).  A big-endian float32 has float32's number too.
_DT_BY_NUM = {np.dtype(info.name).num: info for info in _DT_BY_CODE.values()}
_FLOAT64_NUM = np.dtype(np.float64).num
# byte orders whose bytes are not little-endian on this host
_NOT_LE = (">",) if sys.byteorder == "little" else (">", "=")


# --------------------------------------------------------------------------- the header on the wire

_U64 = Annotated[int, msgspec.Meta(ge=0)]  # MessagePack ints stop at 2**64 - 1
_Mac = Annotated[bytes, msgspec.Meta(min_length=signing.MAC_BYTES, max_length=signing.MAC_BYTES)]
_BundleBytes = Annotated[bytes, msgspec.Meta(min_length=8, max_length=8)]
_Dim = Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]


class _FeaturesHeader(msgspec.Struct, array_like=True, tag=1, frozen=True, forbid_unknown_fields=True):
    request_id: _U64
    device_id: str
    bundle_id: _BundleBytes
    seq: _U64
    t_send_us: _U64
    dtype: int
    shape: list[_Dim]
    scale: Optional[float]
    zero_point: Optional[int]
    encoding: int
    mac: Optional[_Mac] = None  # always last: its 16 bytes end the header


class _ResultHeader(msgspec.Struct, array_like=True, tag=2, frozen=True, forbid_unknown_fields=True):
    request_id: _U64
    device_id: str
    bundle_id: _BundleBytes
    seq: _U64
    t_send_us: _U64
    dtype: int
    shape: list[_Dim]
    scale: Optional[float]
    zero_point: Optional[int]
    encoding: int
    t_recv_us: _U64
    t_done_us: _U64
    label: Optional[Annotated[int, msgspec.Meta(ge=0, le=LABEL_MAX)]]
    error: Optional[str] = None
    mac: Optional[_Mac] = None  # always last: its 16 bytes end the header


_HEADER_FIELDS = {1: ("kind",) + _FeaturesHeader.__struct_fields__,
                  2: ("kind",) + _ResultHeader.__struct_fields__}
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_FeaturesHeader | _ResultHeader)
_ZERO_MAC = bytes(signing.MAC_BYTES)
_MAC_MARK = b"\xc4" + bytes([signing.MAC_BYTES])  # MessagePack bin8 of 16 bytes


# --------------------------------------------------------------------------- field checks
# One definition of each rule, used both by Frame (a program building a frame)
# and by decode_frame (a frame off the wire), so the two cannot drift apart.

_CACHE_MAX = 4096  # ids are few per deployment; a flood of new ones just empties the cache
_valid_device_ids: set[str] = set()
_bundle_ids: dict[str, str] = {}  # as given -> lower case
_valid_scales: dict[float, float] = {}  # as given -> float32-rounded
_HEX = frozenset("0123456789abcdefABCDEF")
_F32 = struct.Struct("<f")


def _as_int(value: object, what: str, lo: int = 0, hi: int = U64_MAX) -> int:
    if type(value) is int and lo <= value <= hi:  # the common case, without isinstance chains
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _fail("bad-field", f"{what} must be an int, got {type(value).__name__}", fix=f"pass {what} as an int")
    value = int(value)
    if not lo <= value <= hi:
        raise _fail("bad-field", f"{what} {value} is outside [{lo}, {hi}]", fix=f"use a {what} in that range")
    return value


def _check_device_id(value: object, where: str = "") -> None:
    if type(value) is str and value in _valid_device_ids:
        return
    try:
        check_id(value, "device id")
    except TopicError as e:
        raise _fail("bad-device-id", where + e.message, fix=e.fix) from None
    if type(value) is str:  # a str subclass could hash or compare oddly: never cached
        if len(_valid_device_ids) >= _CACHE_MAX:
            _valid_device_ids.clear()
        _valid_device_ids.add(value)


def _bundle_id(value: object) -> str:
    """The bundle id in lower case, or FrameError."""
    if type(value) is str:
        known = _bundle_ids.get(value)
        if known is not None:
            return known
    if not (isinstance(value, str) and len(value) == BUNDLE_ID_CHARS and _HEX.issuperset(value)):
        raise _fail("bad-bundle-id", f"bundle id {value!r} is not {BUNDLE_ID_CHARS} hex characters",
                    fix="use the bundle's id from its manifest (bundle.bundle_id)")
    low = value.lower()
    if type(value) is str:
        if len(_bundle_ids) >= _CACHE_MAX:
            _bundle_ids.clear()
        _bundle_ids[value] = low
    return low


def _as_tensor(value: object) -> tuple[np.ndarray, _DType]:
    """``value`` as a read-only little-endian C-order array of a wire dtype, and that dtype."""
    if type(value) is np.ndarray:
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise _fail("bad-tensor", f"tensor is not an array: {e}", fix="pass a numpy array") from None
    dt = arr.dtype
    info = _DT_BY_NUM.get(dt.num)
    if info is None:
        raise _fail("bad-dtype", f"tensor dtype {dt} is not allowed on the wire",
                    fix=f"convert it to one of {', '.join(DTYPES)}")
    shape = arr.shape
    if len(shape) > MAX_NDIM:
        raise _fail("bad-shape", f"tensor has {len(shape)} dimensions, the limit is {MAX_NDIM}",
                    fix="reshape it to at most 8 dimensions")
    for d in shape:
        if d > MAX_DIM:
            raise _fail("bad-shape", f"tensor dimension too large in shape {shape}", fix="split the tensor")
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


def _check_quantization(scale: object, zero_point: object, info: _DType) -> tuple[float | None, int | None]:
    """Normalised (scale, zero_point): both None, or a float32-exact scale > 0 and an in-range zero point."""
    if scale is None and zero_point is None:
        return None, None
    if scale is None or zero_point is None:
        raise _fail("bad-quantization", "scale and zero_point come together",
                    fix="give both (an int8 tensor's quantization) or neither")
    if info.is_float:
        raise _fail("bad-quantization", f"a {info.name} tensor cannot carry quantization",
                    fix="drop scale/zero_point or send the integer tensor")
    known = _valid_scales.get(scale) if type(scale) is float else None  # a bundle has one scale
    if known is not None:
        scale = known
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise _fail("bad-quantization", f"scale must be a number, got {type(scale).__name__}",
                        fix="use the feature spec's scale from the manifest")
        given = float(scale)
        scale = _float32_scale(given)
        if not (math.isfinite(scale) and scale > 0):
            raise _fail("bad-quantization", f"scale {scale!r} must be finite and > 0",
                        fix="use the feature spec's scale from the manifest")
        if len(_valid_scales) >= _CACHE_MAX:
            _valid_scales.clear()
        _valid_scales[given] = scale
    if type(zero_point) is int and info.zp_lo <= zero_point <= info.zp_hi:
        return scale, zero_point
    return scale, _as_int(zero_point, "zero_point", info.zp_lo, info.zp_hi)


def _check_result(t_recv_us: object, t_done_us: object, label: object, error: object,
                  shape: tuple[int, ...] | list[int]) -> tuple[int, int, int | None]:
    """Normalised (t_recv_us, t_done_us, label) of a result frame, or FrameError."""
    if t_recv_us is None:
        raise _fail("bad-field", "a result frame needs t_recv_us", fix="use Frame.result(request, ...)")
    t_recv_us = _as_int(t_recv_us, "t_recv_us")
    if t_done_us is None:
        raise _fail("bad-field", "a result frame needs t_done_us", fix="use Frame.result(request, ...)")
    t_done_us = _as_int(t_done_us, "t_done_us")
    if error is not None:
        if not isinstance(error, str) or len(error) > MAX_ERROR_CHARS:
            raise _fail("bad-field", f"error must be a str of at most {MAX_ERROR_CHARS} characters",
                        fix="shorten it (Frame.error_result truncates for you)")
    elif label is None:
        raise _fail("bad-label", "a result frame needs a label (or an error)",
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
            raise _fail("bad-kind", f"frame kind {kind!r} is unknown", fix=f"use one of {', '.join(KINDS)}")
        request_id = _as_int(request_id, "request_id")
        seq = _as_int(seq, "seq")
        t_send_us = _as_int(t_send_us, "t_send_us")
        _check_device_id(device_id)
        bundle_id = _bundle_id(bundle_id)
        tensor, info = _as_tensor(tensor)
        scale, zero_point = _check_quantization(scale, zero_point, info)
        if kind == FEATURES:
            if t_recv_us is not None or t_done_us is not None or label is not None or error is not None:
                extra = [n for n, v in (("t_recv_us", t_recv_us), ("t_done_us", t_done_us), ("label", label),
                                        ("error", error)) if v is not None]
                raise _fail("bad-field", f"a features frame cannot carry {', '.join(extra)}",
                            fix="those fields belong to result frames (Frame.result)")
        else:
            t_recv_us, t_done_us, label = _check_result(t_recv_us, t_done_us, label, error, tensor.shape)
        if mac is not None and (not isinstance(mac, bytes) or len(mac) != signing.MAC_BYTES):
            raise _fail("bad-mac", f"mac must be {signing.MAC_BYTES} bytes", fix="leave mac unset; encode_frame signs")
        if not isinstance(encoding, str) or encoding not in _ENCODING_CODE:
            raise _fail("bad-encoding", f"encoding {encoding!r} is unknown", fix="use 'raw' or 'zstd'")
        self.__dict__.update(kind=kind, request_id=request_id, device_id=device_id, bundle_id=bundle_id, seq=seq,
                             t_send_us=t_send_us, tensor=tensor, scale=scale, zero_point=zero_point,
                             t_recv_us=t_recv_us, t_done_us=t_done_us, label=label, error=error, mac=mac,
                             encoding=encoding)

    @classmethod
    def _trusted(cls, fields: dict) -> "Frame":
        """A Frame from fields that are already valid and normalised (decode_frame's checks); no second pass."""
        frame = object.__new__(cls)
        frame.__dict__.update(fields)
        return frame

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
        info = _DT_BY_NUM.get(self.tensor.dtype.num)
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


# --------------------------------------------------------------------------- encode

_local = threading.local()  # zstd contexts are not thread-safe


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


_F32_BE = struct.Struct(">f")
_scale_raw: dict[float, msgspec.Raw] = {}  # a bundle has one scale: encode its bytes once


def _f32(x: float | None) -> msgspec.Raw | None:
    # msgspec writes every float as float64 (9 bytes); a quantization scale is a
    # float32 (TFLite's), so write it as MessagePack float32 (5 bytes) ourselves.
    if x is None:
        return None
    raw = _scale_raw.get(x)
    if raw is None:
        raw = msgspec.Raw(b"\xca" + _F32_BE.pack(x))
        if len(_scale_raw) >= _CACHE_MAX:
            _scale_raw.clear()
        _scale_raw[x] = raw
    return raw


def _header(frame: Frame, encoding: int, mac: bytes | None) -> msgspec.Struct:
    tensor = frame.tensor
    code = _DT_BY_NUM[tensor.dtype.num].code
    if frame.kind == FEATURES:
        return _FeaturesHeader(frame.request_id, frame.device_id, bytes.fromhex(frame.bundle_id), frame.seq,
                               frame.t_send_us, code, list(tensor.shape), _f32(frame.scale), frame.zero_point,
                               encoding, mac)
    return _ResultHeader(frame.request_id, frame.device_id, bytes.fromhex(frame.bundle_id), frame.seq,
                         frame.t_send_us, code, list(tensor.shape), _f32(frame.scale), frame.zero_point,
                         encoding, frame.t_recv_us, frame.t_done_us, frame.label, frame.error, mac)


_RAW, _ZSTD = _ENCODING_CODE["raw"], _ENCODING_CODE["zstd"]


def _body(tensor: np.ndarray, compress: str) -> tuple[int, object]:
    """(encoding code, body); a raw body is the tensor itself (C-contiguous: no copy until the payload is joined)."""
    nbytes = tensor.nbytes
    if compress == "raw" or not nbytes or (compress == "auto" and nbytes < AUTO_MIN_BYTES):
        return _RAW, tensor
    packed = _zstd_c().compress(tensor)
    if compress == "zstd" or len(packed) <= (1 - AUTO_MIN_SAVING) * nbytes:
        return _ZSTD, packed
    return _RAW, tensor


def encode_frame(frame: Frame, *, compress: str = "auto", key: signing.KeySource | None = None) -> bytes:
    """The MQTT payload for ``frame``.

    ``compress``: ``"raw"`` (or ``"none"``), ``"zstd"``, or ``"auto"`` (zstd when the tensor has
    at least 256 bytes and zstd saves at least 10 %).  ``key`` (bytes, or a
    {device_id: key} mapping / callable) adds a MAC.
    """
    if not isinstance(frame, Frame):
        raise UsageError(f"encode_frame needs a Frame, got {type(frame).__name__}",
                         fix="build one with Frame.features(...) or Frame.result(...)")
    if compress == "none":
        compress = "raw"  # a common spelling of "do not compress"
    if compress not in ("auto", "raw", "zstd"):
        raise UsageError(f"compress={compress!r} is unknown", fix="use 'auto', 'raw' (or 'none') or 'zstd'")
    k = None if key is None else signing.key_for(key, frame.device_id)
    encoding, body = _body(frame.tensor, compress)
    header = _encoder.encode(_header(frame, encoding, None if k is None else _ZERO_MAC))
    if len(header) > 0xFFFF:
        raise _fail("header-too-large", f"the header needs {len(header)} bytes, the format allows 65535",
                    fix="shorten the error text")
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header))
    if k is None:
        return b"".join((prefix, header, body))
    # The MAC covers every byte with its own 16 bytes zeroed (they end the header), then fills them in.
    mac = signing.compute_mac(k, prefix, header, body)
    return b"".join((prefix, header[:-signing.MAC_BYTES], mac, body))


def header_size(frame: Frame, *, signed: bool = False) -> int:
    """Bytes a frame spends before its tensor bytes (prefix + header): the wire overhead.

    The same for raw and zstd bodies (the encoding code is one byte either way).
    """
    if not isinstance(frame, Frame):
        raise UsageError(f"header_size needs a Frame, got {type(frame).__name__}", fix="pass a Frame")
    return PREFIX_BYTES + len(_encoder.encode(_header(frame, _RAW, _ZERO_MAC if signed else None)))


# --------------------------------------------------------------------------- decode

_PATH = re.compile(r" - at `\$\[(\d+)\](.*)`$")


def _header_error(raw: bytes, e: msgspec.MsgspecError) -> FrameError:
    """A FrameError naming the header field msgspec complained about."""
    text = str(e)
    m = _PATH.search(text)
    if m is None or not isinstance(e, msgspec.ValidationError):
        return _fail("bad-header", f"header is not a valid frame header: {text}",
                     fix="encode frames with protocol.frame.encode_frame (same edgesplit version)")
    idx, rest = int(m.group(1)), m.group(2)
    text = text[:m.start()]
    if idx == 0:
        return _fail("bad-kind", f"header field 'kind': {text} (1 = features, 2 = result)",
                     fix="this decoder knows kinds 1 and 2; upgrade it if the sender is newer")
    try:
        tag = msgspec.msgpack.decode(raw)[0]
        name = _HEADER_FIELDS[tag][idx]
    except Exception:  # the header was bad enough already; any name will do
        name = f"#{idx}"
    return _fail("bad-header", f"header field {name!r}{rest}: {text}",
                 fix="encode frames with protocol.frame.encode_frame (same edgesplit version)")


def decode_frame(payload: bytes | bytearray | memoryview, *, key: signing.KeySource | None = None,
                 limits: FrameLimits = _DEFAULT_LIMITS) -> Frame:
    """Parse and check one MQTT payload; raise FrameError (with ``.reason``) for anything wrong.

    With ``key`` (bytes, or a {device_id: key} mapping / callable) the MAC is
    required and verified before the tensor is touched.  Without it a MAC that
    is present is kept in ``frame.mac`` but not checked.  A raw tensor is a
    read-only view of ``payload`` (no copy): do not change a bytearray payload
    while its frame is in use.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _fail("bad-payload", f"payload must be bytes, got {type(payload).__name__}",
                    fix="pass message.payload as received")
    if isinstance(payload, memoryview):
        payload = payload.cast("B") if payload.c_contiguous else payload.tobytes()
    view = memoryview(payload)
    n = view.nbytes
    if n > limits.max_payload_bytes:
        raise _fail("too-large", f"payload of {n} bytes exceeds the limit of {limits.max_payload_bytes}",
                    fix="raise FrameLimits.max_payload_bytes if such tensors are expected")
    if n < PREFIX_BYTES:
        raise _fail("truncated", f"truncated frame: {n} bytes, the fixed prefix alone needs {PREFIX_BYTES}",
                    fix="publish whole frames made by encode_frame")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise _fail("bad-magic", f"bad magic {magic.hex(' ')}: expected {MAGIC.hex(' ')} ('ES'); "
                                 "not an edgesplit frame", fix="publish frames made by encode_frame")
    if version != VERSION:
        raise _fail("bad-version", f"unsupported frame version {version}: this decoder reads version {VERSION}",
                    fix="run the same edgesplit version on devices and cloud")
    if hlen == 0:
        raise _fail("bad-header", "header length is 0", fix="publish frames made by encode_frame")
    if hlen > limits.max_header_bytes:
        raise _fail("bad-header", f"header length {hlen} exceeds the limit of {limits.max_header_bytes}",
                    fix="raise FrameLimits.max_header_bytes if long error texts are expected")
    end = PREFIX_BYTES + hlen
    if end > n:
        raise _fail("truncated", f"truncated frame: header length {hlen} runs past the end of the "
                                 f"{n}-byte payload", fix="publish whole frames made by encode_frame")
    raw_header = view[PREFIX_BYTES:end]
    try:
        h = _decoder.decode(raw_header)
    except msgspec.MsgspecError as e:
        raise _header_error(bytes(raw_header), e) from None
    except UnicodeDecodeError as e:  # msgspec lets invalid UTF-8 in a str through as this
        raise _fail("bad-header", f"header is not a valid frame header: a text field is not UTF-8 ({e.reason})",
                    fix="encode frames with protocol.frame.encode_frame") from None
    device_id = h.device_id
    _check_device_id(device_id, "header field 'device_id': ")

    info = _DT_BY_CODE.get(h.dtype)
    if info is None:
        raise _fail("bad-dtype", f"dtype code {h.dtype} is not allowed "
                                 f"(known: {', '.join(f'{c}={n}' for c, n in DTYPE_CODES.items())})",
                    fix=f"send one of {', '.join(DTYPES)}")
    encoding = ENCODING_CODES.get(h.encoding)
    if encoding is None:
        raise _fail("bad-encoding", f"payload encoding code {h.encoding} is unknown (0 = raw, 1 = zstd)",
                    fix="send raw or zstd bodies")
    shape = h.shape
    if len(shape) > limits.max_ndim:
        raise _fail("bad-shape", f"shape has {len(shape)} dimensions, the limit is {limits.max_ndim}",
                    fix="send tensors of at most 8 dimensions")
    max_dim = limits.max_dim
    for d in shape:
        if d > max_dim:
            raise _fail("bad-shape", f"dimension {d} in shape {shape} exceeds the limit of {max_dim}",
                        fix="raise FrameLimits.max_dim if such tensors are expected")
    expected = math.prod(shape) * info.itemsize  # Python ints: no overflow
    if expected > limits.max_tensor_bytes:
        raise _fail("too-large", f"shape {shape} of {info.name} needs {expected} bytes, the limit is "
                                 f"{limits.max_tensor_bytes}",
                    fix="raise FrameLimits.max_tensor_bytes if such tensors are expected")

    k = None if key is None else signing.key_for(key, device_id)  # unknown device -> FrameError
    if k is not None:
        if h.mac is None:
            raise _fail("bad-mac", f"bad MAC: the frame from {device_id!r} is not signed",
                        fix="give the device its key (--key) or stop requiring signatures")
        at = end - signing.MAC_BYTES
        # The MAC is the header's last element, so its 16 bytes end the header.
        if view[at - 2:at] != _MAC_MARK:
            raise _fail("bad-mac", "bad MAC: the MAC is not the header's last field",
                        fix="encode frames with protocol.frame.encode_frame")
        if not signing.verify_mac(k, h.mac, view[:at], _ZERO_MAC, view[end:]):
            raise _fail("bad-mac", f"bad MAC: the frame from {device_id!r} was altered or signed with "
                                   "another key", fix="check that the device and the worker hold the same key")

    if encoding == "raw":
        size = n - end
        if size != expected:
            what = "truncated tensor" if size < expected else "trailing bytes"
            raise _fail("bad-size", f"{what}: shape {shape} of {info.name} needs {expected} bytes, "
                                    f"the payload carries {size}",
                        fix="publish whole frames made by encode_frame")
        data, offset = payload, end  # the tensor is a view of the payload
    else:
        data, offset = _unzstd(view[end:], expected), 0
    try:
        tensor = np.ndarray(shape, info.le, data, offset)
    except (ValueError, TypeError) as e:  # cannot happen after the size checks; keep the one-error promise
        raise _fail("bad-size", f"tensor bytes do not fit shape {shape}: {e}") from None
    if tensor.flags.writeable:  # a bytearray payload: nobody writes through the frame's tensor
        tensor.setflags(write=False)

    scale, zero_point = _check_quantization(h.scale, h.zero_point, info)
    fields = {"kind": FEATURES, "request_id": h.request_id, "device_id": device_id,
              "bundle_id": h.bundle_id.hex(), "seq": h.seq, "t_send_us": h.t_send_us, "tensor": tensor,
              "scale": scale, "zero_point": zero_point, "t_recv_us": None, "t_done_us": None, "label": None,
              "error": None, "mac": h.mac, "encoding": encoding}
    if type(h) is _ResultHeader:
        fields["kind"] = RESULT
        fields["t_recv_us"], fields["t_done_us"], fields["label"] = _check_result(
            h.t_recv_us, h.t_done_us, h.label, h.error, shape)
        fields["error"] = h.error
    # Every rule Frame.__init__ applies holds by now: the header types (ints in
    # range, 8-byte bundle id, 16-byte MAC, dims), the checks above, and the shared
    # _check_* functions.  So the Frame is built without validating it twice.
    return Frame._trusted(fields)


def _unzstd(body: memoryview, expected: int) -> bytes:
    """Decompress one zstd frame whose declared content size must be ``expected`` (checked first)."""
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise _fail("bad-zstd", f"body is not a zstd frame: {e}", fix="send raw or zstd bodies from encode_frame")
    if declared < 0:
        raise _fail("bad-zstd", "zstd frame does not declare its content size",
                    fix="compress with the content size written (encode_frame does)")
    if declared != expected:
        raise _fail("bad-size", f"zstd content size {declared} does not match the shape's {expected} bytes",
                    fix="publish frames made by encode_frame")
    try:
        out = _zstd_d().decompress(body, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise _fail("bad-zstd", f"corrupt zstd body: {e}", fix="publish frames made by encode_frame") from None
    if len(out) != expected:
        raise _fail("bad-size", f"zstd body decompressed to {len(out)} bytes, the shape needs {expected}",
                    fix="publish frames made by encode_frame")
    return out
