"""The wire frame: one MQTT payload per feature tensor or result.

Layout (docs/frame-format.md has every byte)::

    "ES" | version (1 byte) | header length (uint16 LE) | header (MessagePack array) | tensor bytes

Everything travels in the payload, so a frame is the same on MQTT 3.1.1 and 5.
The header is a positional msgspec Struct (small: about 60 bytes for an int8
pool2 tensor); the tensor bytes are raw little-endian C order, or one zstd
frame when that pays.  ``decode_frame`` bounds every length before it
allocates and raises only ``FrameError``, whose ``reason`` is one of the closed
list ``protocol.errors.Reason`` (``bad-magic``, ``bad-mac``, ...) for counters and dead letters.

This is the hot path of every device and worker (one encode and one decode per
inference on each side), so it avoids numpy's slow Python-level attributes
(``dtype.name``, ``np.iinfo``, ``np.errstate``) in favour of tables built at
import, and the decoder builds its Frame from fields it has already checked
(``protocol.fields.frame_from_checked``) instead of validating them a second time.  The Frame
value and the rule for each of its fields are in ``protocol.fields``; the bytes are here.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import struct
import threading
from dataclasses import dataclass
from typing import Annotated, Optional

import msgspec
import numpy as np
import zstandard

from protocol import signing
from protocol.errors import FrameError, Reason, UsageError
# the Frame value and its field rules; re-exported here, where callers have always found them
from protocol.fields import (BUNDLE_ID_CHARS, DTYPE_BY_CODE, DTYPE_BY_NUM, DTYPE_CODES, DTYPES, ENCODING_CODE,
                             ENCODING_CODES, FEATURES, KINDS, LABEL_MAX, MAX_DIM, MAX_ERROR_CHARS, MAX_NDIM,
                             RESULT, U64_MAX, CACHE_MAX, Frame, check_device_id, check_quantization,
                             check_result, frame_from_checked, now_us)

log = logging.getLogger(__name__)

__all__ = ["encode_frame", "decode_frame", "header_size", "peek_ids", "FrameLimits", "MAGIC", "VERSION", "PREFIX_BYTES",
           "AUTO_MIN_BYTES", "AUTO_MIN_SAVING", "ZSTD_LEVEL",
           # from protocol.fields
           "Frame", "now_us", "FEATURES", "RESULT", "KINDS", "DTYPE_CODES", "DTYPES", "ENCODING_CODES",
           "MAX_NDIM", "MAX_DIM", "MAX_ERROR_CHARS", "BUNDLE_ID_CHARS", "U64_MAX", "LABEL_MAX"]

MAGIC = b"ES"
VERSION = 1
_PREFIX = struct.Struct("<2sBH")  # magic, version, header length
PREFIX_BYTES = _PREFIX.size       # 5


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
        if len(_scale_raw) >= CACHE_MAX:
            _scale_raw.clear()
        _scale_raw[x] = raw
    return raw


def _header(frame: Frame, encoding: int, mac: bytes | None) -> msgspec.Struct:
    tensor = frame.tensor
    code = DTYPE_BY_NUM[tensor.dtype.num].code
    if frame.kind == FEATURES:
        return _FeaturesHeader(frame.request_id, frame.device_id, bytes.fromhex(frame.bundle_id), frame.seq,
                               frame.t_send_us, code, list(tensor.shape), _f32(frame.scale), frame.zero_point,
                               encoding, mac)
    return _ResultHeader(frame.request_id, frame.device_id, bytes.fromhex(frame.bundle_id), frame.seq,
                         frame.t_send_us, code, list(tensor.shape), _f32(frame.scale), frame.zero_point,
                         encoding, frame.t_recv_us, frame.t_done_us, frame.label, frame.error, mac)


_RAW, _ZSTD = ENCODING_CODE["raw"], ENCODING_CODE["zstd"]


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
        raise FrameError(Reason.HEADER_TOO_LARGE, f"the header needs {len(header)} bytes, the format allows 65535",
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
        return FrameError(Reason.BAD_HEADER, f"header is not a valid frame header: {text}",
                          fix="encode frames with protocol.frame.encode_frame (same edgesplit version)")
    idx, rest = int(m.group(1)), m.group(2)
    text = text[:m.start()]
    if idx == 0:
        return FrameError(Reason.BAD_KIND, f"header field 'kind': {text} (1 = features, 2 = result)",
                          fix="this decoder knows kinds 1 and 2; upgrade it if the sender is newer")
    try:
        tag = msgspec.msgpack.decode(raw)[0]
        name = _HEADER_FIELDS[tag][idx]
    except Exception:  # the header was bad enough already; any name will do
        name = f"#{idx}"
    return FrameError(Reason.BAD_HEADER, f"header field {name!r}{rest}: {text}",
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
        raise FrameError(Reason.BAD_PAYLOAD, f"payload must be bytes, got {type(payload).__name__}",
                         fix="pass message.payload as received")
    if isinstance(payload, memoryview):
        payload = payload.cast("B") if payload.c_contiguous else payload.tobytes()
    view = memoryview(payload)
    n = view.nbytes
    if n > limits.max_payload_bytes:
        raise FrameError(Reason.TOO_LARGE, f"payload of {n} bytes exceeds the limit of {limits.max_payload_bytes}",
                         fix="raise FrameLimits.max_payload_bytes if such tensors are expected")
    if n < PREFIX_BYTES:
        raise FrameError(Reason.TRUNCATED, f"truncated frame: {n} bytes, the fixed prefix alone needs {PREFIX_BYTES}",
                         fix="publish whole frames made by encode_frame")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(Reason.BAD_MAGIC, f"bad magic {magic.hex(' ')}: expected {MAGIC.hex(' ')} ('ES'); "
                                           "not an edgesplit frame", fix="publish frames made by encode_frame")
    if version != VERSION:
        raise FrameError(Reason.BAD_VERSION,
                         f"unsupported frame version {version}: this decoder reads version {VERSION}",
                         fix="run the same edgesplit version on devices and cloud")
    if hlen == 0:
        raise FrameError(Reason.BAD_HEADER, "header length is 0", fix="publish frames made by encode_frame")
    if hlen > limits.max_header_bytes:
        raise FrameError(Reason.BAD_HEADER, f"header length {hlen} exceeds the limit of {limits.max_header_bytes}",
                         fix="raise FrameLimits.max_header_bytes if long error texts are expected")
    end = PREFIX_BYTES + hlen
    if end > n:
        raise FrameError(Reason.TRUNCATED, f"truncated frame: header length {hlen} runs past the end of the "
                                           f"{n}-byte payload", fix="publish whole frames made by encode_frame")
    raw_header = view[PREFIX_BYTES:end]
    try:
        h = _decoder.decode(raw_header)
    except msgspec.MsgspecError as e:
        raise _header_error(bytes(raw_header), e) from None
    except UnicodeDecodeError as e:  # msgspec lets invalid UTF-8 in a str through as this
        raise FrameError(Reason.BAD_HEADER,
                         f"header is not a valid frame header: a text field is not UTF-8 ({e.reason})",
                         fix="encode frames with protocol.frame.encode_frame") from None
    device_id = h.device_id
    check_device_id(device_id, "header field 'device_id': ")

    info = DTYPE_BY_CODE.get(h.dtype)
    if info is None:
        raise FrameError(Reason.BAD_DTYPE, f"dtype code {h.dtype} is not allowed "
                                           f"(known: {', '.join(f'{c}={n}' for c, n in DTYPE_CODES.items())})",
                         fix=f"send one of {', '.join(DTYPES)}")
    encoding = ENCODING_CODES.get(h.encoding)
    if encoding is None:
        raise FrameError(Reason.BAD_ENCODING, f"payload encoding code {h.encoding} is unknown (0 = raw, 1 = zstd)",
                         fix="send raw or zstd bodies")
    shape = h.shape
    if len(shape) > limits.max_ndim:
        raise FrameError(Reason.BAD_SHAPE, f"shape has {len(shape)} dimensions, the limit is {limits.max_ndim}",
                         fix="send tensors of at most 8 dimensions")
    max_dim = limits.max_dim
    for d in shape:
        if d > max_dim:
            raise FrameError(Reason.BAD_SHAPE, f"dimension {d} in shape {shape} exceeds the limit of {max_dim}",
                             fix="raise FrameLimits.max_dim if such tensors are expected")
    expected = math.prod(shape) * info.itemsize  # Python ints: no overflow
    if expected > limits.max_tensor_bytes:
        raise FrameError(Reason.TOO_LARGE, f"shape {shape} of {info.name} needs {expected} bytes, the limit is "
                                           f"{limits.max_tensor_bytes}",
                         fix="raise FrameLimits.max_tensor_bytes if such tensors are expected")

    k = None if key is None else signing.key_for(key, device_id)  # unknown device -> FrameError
    if k is not None:
        if h.mac is None:
            raise FrameError(Reason.BAD_MAC, f"bad MAC: the frame from {device_id!r} is not signed",
                             fix="give the device its key (--key) or stop requiring signatures")
        at = end - signing.MAC_BYTES
        # The MAC is the header's last element, so its 16 bytes end the header.
        if view[at - 2:at] != _MAC_MARK:
            raise FrameError(Reason.BAD_MAC, "bad MAC: the MAC is not the header's last field",
                             fix="encode frames with protocol.frame.encode_frame")
        if not signing.verify_mac(k, h.mac, view[:at], _ZERO_MAC, view[end:]):
            raise FrameError(Reason.BAD_MAC, f"bad MAC: the frame from {device_id!r} was altered or signed with "
                                             "another key",
                             fix="check that the device and the worker hold the same key")

    if encoding == "raw":
        size = n - end
        if size != expected:
            what = "truncated tensor" if size < expected else "trailing bytes"
            raise FrameError(Reason.BAD_SIZE, f"{what}: shape {shape} of {info.name} needs {expected} bytes, "
                                              f"the payload carries {size}",
                             fix="publish whole frames made by encode_frame")
        data, offset = payload, end  # the tensor is a view of the payload
    else:
        data, offset = _unzstd(view[end:], expected), 0
    try:
        tensor = np.ndarray(shape, info.le, data, offset)
    except (ValueError, TypeError) as e:  # cannot happen after the size checks; keep the one-error promise
        raise FrameError(Reason.BAD_SIZE, f"tensor bytes do not fit shape {shape}: {e}") from None
    if tensor.flags.writeable:  # a bytearray payload: nobody writes through the frame's tensor
        tensor.setflags(write=False)

    scale, zero_point = check_quantization(h.scale, h.zero_point, info)
    fields = {"kind": FEATURES, "request_id": h.request_id, "device_id": device_id,
              "bundle_id": h.bundle_id.hex(), "seq": h.seq, "t_send_us": h.t_send_us, "tensor": tensor,
              "scale": scale, "zero_point": zero_point, "t_recv_us": None, "t_done_us": None, "label": None,
              "error": None, "mac": h.mac, "encoding": encoding}
    if type(h) is _ResultHeader:
        fields["kind"] = RESULT
        fields["t_recv_us"], fields["t_done_us"], fields["label"] = check_result(
            h.t_recv_us, h.t_done_us, h.label, h.error, shape)
        fields["error"] = h.error
    # Every rule Frame.__init__ applies holds by now: the header types (ints in
    # range, 8-byte bundle id, 16-byte MAC, dims), the checks above, and the shared
    # _check_* functions.  So the Frame is built without validating it twice.
    return frame_from_checked(fields)


def _unzstd(body: memoryview, expected: int) -> bytes:
    """Decompress one zstd frame whose declared content size must be ``expected`` (checked first)."""
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise FrameError(Reason.BAD_ZSTD, f"body is not a zstd frame: {e}",
                         fix="send raw or zstd bodies from encode_frame")
    if declared < 0:
        raise FrameError(Reason.BAD_ZSTD, "zstd frame does not declare its content size",
                         fix="compress with the content size written (encode_frame does)")
    if declared != expected:
        raise FrameError(Reason.BAD_SIZE, f"zstd content size {declared} does not match the shape's {expected} bytes",
                         fix="publish frames made by encode_frame")
    try:
        out = _zstd_d().decompress(body, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FrameError(Reason.BAD_ZSTD, f"corrupt zstd body: {e}",
                         fix="publish frames made by encode_frame") from None
    if len(out) != expected:
        raise FrameError(Reason.BAD_SIZE, f"zstd body decompressed to {len(out)} bytes, the shape needs {expected}",
                         fix="publish frames made by encode_frame")
    return out


def peek_ids(prefix: bytes | memoryview) -> tuple[int, str, str] | None:
    """(request id, device id, bundle id) from the start of a frame (a dead letter keeps only its first
    bytes), or None when they do not hold a whole header.  Nothing is checked: for bookkeeping only."""
    view = memoryview(prefix).cast("B")
    if view.nbytes < PREFIX_BYTES:
        return None
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC or version != VERSION or PREFIX_BYTES + hlen > view.nbytes:
        return None
    try:
        h = _decoder.decode(view[PREFIX_BYTES:PREFIX_BYTES + hlen])
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return None
    return h.request_id, h.device_id, h.bundle_id.hex()
