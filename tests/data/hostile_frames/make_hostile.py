"""Regenerate the hostile frames in this folder: `python tests/data/hostile_frames/make_hostile.py`.

Each `<name>.bin` is a payload an attacker or a broken sender could publish;
`expected.json` notes the FrameError each must raise (a message fragment and
the error's reason code).  tests/unit/test_frame_hostile.py replays them.
The files are kept in git, so a decoder change that stops rejecting one fails.
"""
import json
import struct
import sys
from pathlib import Path

import msgspec
import numpy as np
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from protocol.frame import Frame, encode_frame  # noqa: E402

KEY = bytes(range(32))           # the test key (hex in expected.json)
OTHER_KEY = bytes(range(1, 33))
BUNDLE = bytes.fromhex("0123456789abcdef")
T = 1_700_000_000_000_000        # a fixed send time (2023-11-14)
POOL2 = (np.arange(3136) % 251 - 125).astype(np.int8).reshape(7, 7, 64)


def prefix(hlen, version=1, magic=b"ES"):
    return struct.pack("<2sBH", magic, version, hlen)


def frame(fields, body, **kw):
    """A frame from a hand-made header list (tag first)."""
    header = msgspec.msgpack.encode(fields)
    return prefix(len(header), **kw) + header + body


def features(request_id=1, device="pi-01", bundle=BUNDLE, seq=1, t=T, dtype=1, shape=(7, 7, 64),
             scale=0.05, zp=-128, enc=0, *extra):
    return [1, request_id, device, bundle, seq, t, dtype, list(shape), scale, zp, enc, *extra]


def result(label=3, error=None, shape=(10,), dtype=5):
    return [2, 1, "pi-01", BUNDLE, 1, T, dtype, list(shape), None, None, 0, T + 10, T + 20, label, error]


def good():
    return Frame.features(POOL2, request_id=1, device_id="pi-01", bundle_id=BUNDLE.hex(), seq=1,
                          scale=0.05, zero_point=-128, t_send_us=T)


RAW = POOL2.tobytes()
cases = {}


def case(name, data, error, reason, note, **extra):
    (HERE / f"{name}.bin").write_bytes(data)
    cases[f"{name}.bin"] = dict(error=error, reason=reason, note=note, **extra)


z = zstandard.ZstdCompressor(level=19)
valid = encode_frame(good(), compress="raw")
signed = encode_frame(good(), compress="raw", key=KEY)

case("empty", b"", "truncated frame", "truncated", "an empty payload")
case("truncated_prefix", valid[:3], "truncated frame", "truncated", "3 bytes: cut inside the fixed prefix")
case("truncated_header", valid[:30], "runs past the end", "truncated", "cut inside the header")
case("truncated_tensor", valid[:-100], "truncated tensor", "bad-size", "the last 100 tensor bytes missing")
case("trailing_bytes", valid + b"\x00" * 7, "trailing bytes", "bad-size", "7 bytes after the tensor")
case("wrong_magic", b"EX" + valid[2:], "bad magic", "bad-magic", "magic 'EX' instead of 'ES'")
case("json_payload", b'{"tensor": [1, 2, 3]}', "bad magic", "bad-magic", "somebody published JSON")
case("unknown_version", valid[:2] + b"\x02" + valid[3:], "unsupported frame version 2", "bad-version",
     "format version 2 does not exist yet")
case("header_length_zero", prefix(0) + valid[5:], "header length is 0", "bad-header", "header length 0")
case("header_length_beyond_payload", prefix(900) + valid[5:60], "runs past the end", "truncated",
     "header length 900 in a 60-byte payload")
case("header_length_over_limit", prefix(60000) + valid[5:], "exceeds the limit of 1024", "bad-header",
     "header length 60000 > FrameLimits.max_header_bytes")
case("header_garbage", prefix(8) + b"\xc1" * 8 + RAW, "not a valid frame header", "bad-header",
     "0xc1 is never used in MessagePack")
case("header_map", frame({"kind": 1}, RAW), "not a valid frame header", "bad-header", "a map, not an array")
case("header_trailing", prefix(len(msgspec.msgpack.encode(features())) + 1)
     + msgspec.msgpack.encode(features()) + b"\x00" + RAW, "not a valid frame header", "bad-header",
     "one byte after the header array, inside the header length")
case("unknown_kind", frame([9] + features()[1:], RAW), "header field 'kind'", "bad-kind", "kind tag 9")
case("missing_fields", frame(features()[:6], RAW), "at least length", "bad-header", "header cut after t_send_us")
case("extra_field", frame(features() + [None, 5], RAW), "at most length", "bad-header",
     "two more fields than the features header has")
case("bad_dtype", frame(features(dtype=9), RAW), "dtype code 9 is not allowed", "bad-dtype", "dtype code 9")
case("bad_dtype_float64", frame(features(dtype=6, scale=None, zp=None, shape=(392,)), RAW),
     "dtype code 6 is not allowed", "bad-dtype", "code 6 (float64 in no version) is not in the allowed set")
case("bad_dtype_string", frame(features(dtype="int8"), RAW), "header field 'dtype'", "bad-header",
     "dtype given as a string")
case("unknown_encoding", frame(features(enc=7), RAW), "encoding code 7", "bad-encoding", "encoding code 7")
case("negative_dim", frame(features(shape=(7, -7, 64)), RAW), "header field 'shape'", "bad-header",
     "a negative dimension")
case("huge_dims", frame(features(shape=(2**32 - 1, 2**32 - 1)), RAW), "exceeds the limit of 16777216",
     "bad-shape", "two dimensions of 2**32 - 1")
case("oversized_dim", frame(features(shape=(2**40,)), RAW), "header field 'shape'", "bad-header",
     "a dimension beyond uint32")
case("too_many_dims", frame(features(shape=(1,) * 9), RAW[:1]), "9 dimensions", "bad-shape", "ndim 9")
case("tensor_too_large", frame(features(shape=(2**24, 2**24)), RAW), "the limit is 16777216", "too-large",
     "dims under the limit, product 2**48 bytes")
case("shape_itemsize_mismatch", frame(features(dtype=3, scale=None, zp=None), RAW), "truncated tensor",
     "bad-size", "int16 header over int8 bytes: shape x itemsize = 6272, body 3136")
case("zero_dim_with_body", frame(features(shape=(0, 64)), RAW), "trailing bytes", "bad-size",
     "an empty shape followed by tensor bytes")
case("zstd_bomb", frame(features(enc=1), z.compress(bytes(64 * 1024 * 1024))), "zstd content size 67108864",
     "bad-size", "a 64 MiB zero block compressed to a few KB; refused before decompressing")
case("zstd_bomb_no_size", frame(features(enc=1), zstandard.ZstdCompressor(write_content_size=False)
                                .compress(bytes(1024 * 1024))), "does not declare its content size", "bad-zstd",
     "zstd frame without a content size, so its output cannot be bounded up front")
lying = bytearray(zstandard.ZstdCompressor(level=3).compress(RAW * 300))  # 940,800 bytes declared
fcs_at = 5  # frame header descriptor 0x80: 4-byte content size after the descriptor byte
assert lying[4] >> 6 == 2, hex(lying[4])
lying[fcs_at:fcs_at + 4] = struct.pack("<I", 3136)
case("zstd_lying_content_size", frame(features(enc=1), bytes(lying)), "corrupt zstd body", "bad-zstd",
     "declares 3136 bytes, expands to 940,800")
case("zstd_garbage", frame(features(enc=1), b"\x28\xb5\x2f\xfd" + bytes(40)), "zstd", "bad-zstd",
     "the zstd magic followed by zeros")
case("zstd_trailing", frame(features(enc=1), z.compress(RAW) + b"junk"), "corrupt zstd body", "bad-zstd",
     "4 bytes after the zstd frame")
case("not_zstd", frame(features(enc=1), RAW), "not a zstd frame", "bad-zstd", "raw bytes marked zstd")
case("bad_device_id_wildcard", frame(features(device="pi+01"), RAW), "contains '+'", "bad-device-id",
     "an MQTT wildcard in the device id")
case("bad_device_id_slash", frame(features(device="fleet/pi"), RAW), "contains '/'", "bad-device-id",
     "a topic separator in the device id")
case("bad_device_id_empty", frame(features(device=""), RAW), "device id is empty", "bad-device-id", "empty id")
case("bad_device_id_nul", frame(features(device="pi\x0001"), RAW), "NUL", "bad-device-id", "NUL in the id")
case("bad_device_id_long", frame(features(device="p" * 65), RAW), "65 characters long", "bad-device-id",
     "65 characters")
case("bad_device_id_type", frame(features(device=42), RAW), "header field 'device_id'", "bad-header",
     "an int where the device id goes")
case("bad_bundle_id", frame(features(bundle=b"\x01\x23\x45"), RAW), "header field 'bundle_id'", "bad-header",
     "a 3-byte bundle id")
case("negative_request_id", frame(features(request_id=-1), RAW), "header field 'request_id'", "bad-header",
     "request id -1")
case("float_with_quantization", frame(features(dtype=5, shape=(784,)), RAW), "cannot carry quantization",
     "bad-quantization", "a float32 tensor with scale and zero point")
case("scale_nan", frame(features(scale=float("nan")), RAW), "finite and > 0", "bad-quantization", "scale NaN")
case("scale_negative", frame(features(scale=-0.5), RAW), "finite and > 0", "bad-quantization", "scale -0.5")
case("zero_point_out_of_range", frame(features(zp=300), RAW), "zero_point 300 is outside [-128, 127]",
     "bad-field", "zero point 300 for int8")
case("scale_without_zero_point", frame(features(zp=None), RAW), "come together", "bad-quantization",
     "scale given, zero point missing")
probs = np.full(10, 0.1, np.float32).tobytes()
case("result_label_out_of_range", frame(result(label=10), probs), "label 10 is outside [0, 9]", "bad-field",
     "label 10 with 10 classes")
case("result_without_label", frame(result(label=None), probs), "needs a label", "bad-label",
     "neither a label nor an error")
case("result_error_too_long", frame(result(label=None, error="x" * 600, shape=(0,)), b""), "at most 512",
     "bad-field", "a 600-character error text")
case("features_with_result_fields", frame(features() + [T], RAW), "header field 'mac'", "bad-header",
     "a features header carrying a result field where only a MAC may follow")
case("bad_mac", encode_frame(good(), compress="raw", key=OTHER_KEY), "bad MAC", "bad-mac",
     "signed with another key", key=KEY.hex())
case("missing_mac", valid, "bad MAC: the frame from 'pi-01' is not signed", "bad-mac",
     "an unsigned frame where signatures are required", key=KEY.hex())
flipped = bytearray(signed)
flipped[-1] ^= 0x01
case("mac_tensor_bit_flip", bytes(flipped), "bad MAC", "bad-mac", "one tensor bit flipped after signing",
     key=KEY.hex())
flipped = bytearray(signed)
flipped[9] ^= 0x01  # inside the request id / device id area
case("mac_header_bit_flip", bytes(flipped), "bad MAC", "bad-mac", "one header bit flipped after signing",
     key=KEY.hex())
case("unknown_device", signed, "unknown device 'pi-01'", "unknown-device",
     "signed, but the worker has no key for this device", keys={"pi-02": KEY.hex()})
case("payload_over_limit", valid, "exceeds the limit of 1000", "too-large",
     "a 3184-byte frame against FrameLimits(max_payload_bytes=1000)", limits={"max_payload_bytes": 1000})

(HERE / "expected.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")
print(f"wrote {len(cases)} hostile frames to {HERE}")
