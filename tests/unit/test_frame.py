"""Wire frames: round trips, self-validation, compression, overhead, signing."""
import numpy as np
import pytest

from protocol import Frame, FrameError, FrameLimits, UsageError, decode_frame, encode_frame, header_size
from protocol.frame import AUTO_MIN_BYTES, DTYPES, PREFIX_BYTES, U64_MAX, now_us

BUNDLE = "0123456789abcdef"
KEY = bytes(range(32))


def pool2(seed=0):
    """An int8 tensor shaped like the paper CNN's pool2 output (7*7*64 = 3136 bytes)."""
    return np.random.default_rng(seed).integers(-128, 128, (1, 7, 7, 64), dtype=np.int8)


def feat(tensor=None, **kw):
    args = dict(request_id=42, device_id="pi-01", bundle_id=BUNDLE, seq=7, t_send_us=1_700_000_000_000_000)
    if tensor is None:
        tensor = pool2()
        args.update(scale=0.0235, zero_point=-128)
    args.update(kw)
    return Frame.features(tensor, **args)


def tensor_of(dtype, shape=(2, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


# ---------------------------------------------------------------- overhead

def test_int8_pool2_header_overhead_is_at_most_64_bytes():
    worst = feat(request_id=U64_MAX, seq=2**32 - 1, t_send_us=now_us())  # random 64-bit id, 4e9 frames in
    typical = feat(request_id=1234, seq=1234, t_send_us=now_us())
    for frame in (worst, typical):
        payload = encode_frame(frame, compress="raw")
        overhead = len(payload) - 3136
        assert overhead == header_size(frame)
        assert overhead <= 64, overhead
    assert header_size(worst) == 61 and header_size(typical) == 53
    # a MAC costs 17 more bytes (16 + its MessagePack tag), nothing else
    assert header_size(worst, signed=True) == header_size(worst) + 17


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", ["raw", "zstd", "auto"])
@pytest.mark.parametrize("signed", [False, True])
def test_features_round_trip_every_dtype_and_encoding(dtype, compress, signed):
    t = tensor_of(dtype, (1, 4, 4, 32))
    quant = dict(scale=0.5, zero_point=3) if np.dtype(dtype).kind in "iu" else {}
    f = feat(t, **quant)
    key = KEY if signed else None
    g = decode_frame(encode_frame(f, compress=compress, key=key), key=key)
    assert g == f
    assert g.tensor.dtype == np.dtype(dtype) and g.shape == (1, 4, 4, 32)
    np.testing.assert_array_equal(g.tensor, t)
    assert (g.mac is not None) == signed
    if compress == "zstd":
        assert g.encoding == "zstd"
    if compress == "raw":
        assert g.encoding == "raw"


@pytest.mark.parametrize("compress", ["raw", "zstd", "auto"])
def test_result_round_trip_echoes_the_request(compress):
    req = feat()
    probs = np.full((1, 10), 0.02, np.float32)
    probs[0, 7] = 0.82
    res = Frame.result(req, probs, t_recv_us=req.t_send_us + 1500, t_done_us=req.t_send_us + 2500)
    assert res.label == 7 and res.ok
    assert (res.request_id, res.device_id, res.bundle_id, res.seq, res.t_send_us) == \
           (req.request_id, req.device_id, req.bundle_id, req.seq, req.t_send_us)
    back = decode_frame(encode_frame(res, compress=compress))
    assert back == res and back.kind == "result" and back.label == 7
    assert back.t_recv_us == req.t_send_us + 1500 and back.t_done_us == req.t_send_us + 2500


def test_error_result_round_trips_and_truncates_long_text():
    res = Frame.error_result(feat(), "unknown bundle 0123456789abcdef " * 40, t_recv_us=1, t_done_us=2)
    back = decode_frame(encode_frame(res))
    assert not back.ok and back.label is None and back.tensor.size == 0
    assert back.error.startswith("unknown bundle") and len(back.error) == 512


def test_float64_probabilities_become_float32():
    res = Frame.result(feat(), np.array([0.1, 0.9]), t_recv_us=1, t_done_us=2)
    assert res.dtype == "float32" and res.label == 1


def test_decoded_tensor_is_little_endian_c_order_and_read_only():
    t = tensor_of("float32", (3, 4)).astype(">f4")  # big-endian input
    f = feat(np.asfortranarray(t))
    g = decode_frame(encode_frame(f, compress="raw"))
    assert g.tensor.dtype.byteorder in "<=" and g.tensor.flags.c_contiguous
    np.testing.assert_array_equal(g.tensor, t)
    with pytest.raises(ValueError):
        g.tensor[0, 0] = 1
    with pytest.raises(ValueError):
        f.tensor[0, 0] = 1


def test_memoryview_and_bytearray_payloads_decode():
    payload = encode_frame(feat())
    assert decode_frame(bytearray(payload)) == decode_frame(memoryview(payload)) == feat()


def test_dequantized_applies_scale_and_zero_point():
    f = feat(np.array([[-128, 0, 127]], np.int8), scale=0.5, zero_point=-128)
    np.testing.assert_allclose(f.dequantized(), [[0.0, 64.0, 127.5]])


def test_scale_travels_as_float32():
    f = feat(scale=0.1, zero_point=0)
    assert f.scale == float(np.float32(0.1))
    assert decode_frame(encode_frame(f)).scale == f.scale


# ---------------------------------------------------------------- compression

def test_auto_compresses_only_when_it_pays():
    sparse = np.zeros((1, 7, 7, 64), np.int8)  # ReLU features are often mostly zero point
    sparse[0, 3, 3, :8] = 5
    small = np.zeros(AUTO_MIN_BYTES - 1, np.int8)
    noise = pool2()
    assert decode_frame(encode_frame(feat(sparse), compress="auto")).encoding == "zstd"
    assert len(encode_frame(feat(sparse), compress="auto")) < 200
    assert decode_frame(encode_frame(feat(small), compress="auto")).encoding == "raw"
    assert decode_frame(encode_frame(feat(noise), compress="auto")).encoding == "raw"
    assert decode_frame(encode_frame(feat(noise), compress="zstd")).encoding == "zstd"


def test_unknown_compress_is_a_usage_error_and_none_means_raw():
    assert encode_frame(feat(), compress="none") == encode_frame(feat(), compress="raw")
    with pytest.raises(UsageError, match="compress='lz4'"):
        encode_frame(feat(), compress="lz4")


# ---------------------------------------------------------------- self-validation

@pytest.mark.parametrize("changes, fragment", [
    (dict(kind="tensor"), "frame kind 'tensor'"),
    (dict(request_id=-1), "request_id -1 is outside"),
    (dict(request_id=2**64), "is outside"),
    (dict(request_id=1.5), "request_id must be an int"),
    (dict(seq=True), "seq must be an int"),
    (dict(device_id="pi/01"), "contains '/'"),
    (dict(device_id=""), "device id is empty"),
    (dict(bundle_id="xyz"), "is not 16 hex characters"),
    (dict(tensor=np.zeros(3, np.float64)), "dtype float64 is not allowed"),
    (dict(tensor=np.zeros((1,) * 9, np.int8)), "9 dimensions"),
    (dict(scale=None), "come together"),
    (dict(scale=0.0), "finite and > 0"),
    (dict(scale=1e39), "finite and > 0"),  # beyond float32
    (dict(kind=["features"]), "frame kind ['features']"),
    (dict(zero_point=-129), "zero_point -129 is outside"),
    (dict(label=3), "features frame cannot carry label"),
])
def test_frame_validates_itself(changes, fragment):
    with pytest.raises(FrameError, match=None) as info:
        feat().replace(**changes)
    assert fragment in str(info.value)


def test_result_needs_times_and_a_label_within_the_classes():
    req = feat()
    probs = np.full(10, 0.1, np.float32)
    with pytest.raises(FrameError, match="needs t_recv_us"):
        Frame("result", 1, "pi-01", BUNDLE, 1, 1, probs, label=1, t_done_us=2)
    with pytest.raises(FrameError, match=r"label 10 is outside \[0, 9\]"):
        Frame.result(req, probs, t_recv_us=1, label=10)
    with pytest.raises(FrameError, match="cannot carry quantization"):
        Frame.result(req, probs, t_recv_us=1).replace(scale=0.1, zero_point=0)


def test_bundle_id_is_normalised_to_lower_case():
    assert feat(bundle_id="0123456789ABCDEF").bundle_id == BUNDLE


def test_frames_compare_by_content_and_are_not_hashable():
    assert feat() == feat() and feat() != feat(seq=8)
    assert feat(pool2(0)) != feat(pool2(1))
    with pytest.raises(TypeError):
        hash(feat())


def test_repr_is_short():
    text = repr(feat())
    assert "tensor=int8[1, 7, 7, 64]" in text and len(text) < 250


# ---------------------------------------------------------------- limits and keys

def test_limits_are_enforced_before_anything_is_allocated():
    payload = encode_frame(feat(np.zeros((64, 64), np.int8)), compress="zstd")
    with pytest.raises(FrameError, match="needs 4096 bytes, the limit is 1000"):
        decode_frame(payload, limits=FrameLimits(max_tensor_bytes=1000))
    with pytest.raises(FrameError, match="dimension 64 .* exceeds the limit of 10"):
        decode_frame(payload, limits=FrameLimits(max_dim=10))
    with pytest.raises(FrameError, match="2 dimensions, the limit is 1"):
        decode_frame(payload, limits=FrameLimits(max_ndim=1))
    with pytest.raises(UsageError):
        FrameLimits(max_header_bytes=70000)


def test_decode_without_key_keeps_but_does_not_check_the_mac():
    payload = encode_frame(feat(), key=KEY)
    assert decode_frame(payload).mac is not None


def test_per_device_keys_from_a_mapping():
    keys = {"pi-01": KEY, "pi-02": bytes(32)}
    payload = encode_frame(feat(), key=keys)
    assert decode_frame(payload, key=keys) == feat()
    with pytest.raises(FrameError, match="bad MAC"):
        decode_frame(payload, key={"pi-01": bytes(32)})
    with pytest.raises(FrameError, match="unknown device 'pi-01'") as info:
        decode_frame(payload, key=lambda device: None)
    assert info.value.reason == "unknown-device"


def test_the_mac_covers_the_prefix_too():
    payload = bytearray(encode_frame(feat(), key=KEY))
    payload[PREFIX_BYTES - 1] ^= 0  # untouched: still fine
    assert decode_frame(bytes(payload), key=KEY) == feat()
    payload[2] = 9  # version byte
    with pytest.raises(FrameError, match="unsupported frame version 9"):
        decode_frame(bytes(payload), key=KEY)


def test_non_bytes_payload_is_a_frame_error():
    with pytest.raises(FrameError, match="payload must be bytes"):
        decode_frame("ES\x01")


# ---------------------------------------------------------------- the spec's examples, byte for byte

EXAMPLE_A = bytes.fromhex(
    "45 53 01 2a 00 9c 01 2a a5 70 69 2d 30 31 c4 08"
    "01 23 45 67 89 ab cd ef 07 cf 00 06 0a 24 18 1e"
    "40 00 01 92 02 03 ca 3f 00 00 00 d0 80 00 c0 80"
    "ff 00 01 02 7f")
EXAMPLE_B_MAC = bytes.fromhex("278e5d290fa1f92b2da98319e3df63a6")


def example_a():
    return Frame.features(np.array([[-128, -1, 0], [1, 2, 127]], np.int8), request_id=42, device_id="pi-01",
                          bundle_id=BUNDLE, seq=7, scale=0.5, zero_point=-128, t_send_us=1_700_000_000_000_000)


def test_docs_example_a_and_b_byte_for_byte():
    """docs/frame-format.md shows these bytes; a change here is a format change."""
    assert encode_frame(example_a()) == EXAMPLE_A
    assert decode_frame(EXAMPLE_A) == example_a()
    signed = encode_frame(example_a(), key=KEY)
    assert len(signed) == 70 and signed[0x30:0x40] == EXAMPLE_B_MAC
    assert decode_frame(signed, key=KEY).mac == EXAMPLE_B_MAC


# ---------------------------------------------------------------- the fast paths keep every rule

def test_a_bytearray_or_sliced_payload_decodes_to_a_read_only_tensor():
    payload = encode_frame(feat(), compress="raw")
    for data in (bytearray(payload), memoryview(b"xx" + payload + b"yy")[2:-2]):
        g = decode_frame(data)
        assert g == feat() and not g.tensor.flags.writeable
        with pytest.raises(ValueError):
            g.tensor[0, 0, 0, 0] = 1


@pytest.mark.parametrize("dtype", DTYPES + (">f4", ">i2", "<f2"))
def test_dtype_names_every_wire_dtype_in_any_byte_order(dtype):
    f = feat(tensor_of(dtype, (2, 3)))
    assert f.dtype == np.dtype(dtype).newbyteorder("=").name
    assert decode_frame(encode_frame(f)).dtype == f.dtype


def test_values_seen_before_are_still_checked_against_the_rest_of_the_frame():
    """Ids and scales already validated once skip re-parsing, not the rules that involve other fields."""
    ok = feat(np.zeros(4, np.int8), scale=0.5, zero_point=0)
    assert ok.scale == 0.5
    with pytest.raises(FrameError, match="cannot carry quantization"):
        feat(np.zeros(4, np.float32), scale=0.5, zero_point=0)
    with pytest.raises(FrameError, match="zero_point 200 is outside"):
        feat(np.zeros(4, np.int8), scale=0.5, zero_point=200)
    with pytest.raises(FrameError, match="come together"):
        feat(np.zeros(4, np.int8), scale=0.5)
    assert feat(bundle_id=BUNDLE.upper()).bundle_id == feat(bundle_id=BUNDLE.upper()).bundle_id == BUNDLE
    with pytest.raises(FrameError, match="device id 'pi-01 ' contains whitespace"):
        feat(device_id="pi-01 ")


def test_a_decoded_frame_is_the_frame_its_constructor_would_build():
    f = feat(scale=0.1, zero_point=-3)
    g = decode_frame(encode_frame(f))
    fields = ("kind", "request_id", "device_id", "bundle_id", "seq", "t_send_us", "scale", "zero_point",
              "t_recv_us", "t_done_us", "label", "error")
    assert [(getattr(g, n), type(getattr(g, n))) for n in fields] == \
           [(getattr(f, n), type(getattr(f, n))) for n in fields]
    rebuilt = Frame(**{n: getattr(g, n) for n in fields}, tensor=g.tensor, mac=g.mac, encoding=g.encoding)
    assert rebuilt == g and repr(rebuilt) == repr(g)
