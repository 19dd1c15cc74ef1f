"""Property tests: any valid frame round-trips; no byte string makes the decoder raise anything but FrameError."""
import os
import struct

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from protocol import Frame, FrameError, TopicError, decode_frame, encode_frame
from protocol.frame import DTYPES, U64_MAX
from protocol.topics import check_id

# Modest example counts keep the unit suite fast; the mutation tests try several mutations per frame.
# EDGESPLIT_FUZZ=50 multiplies them for a deeper run.
FUZZ = max(1, int(os.environ.get("EDGESPLIT_FUZZ", "1")))
SETTINGS = settings(max_examples=80 * FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(max_examples=300 * FUZZ, deadline=None)
MUTATIONS_PER_FRAME = 8
KEY = bytes(range(32))


def _valid_id(s):
    try:
        check_id(s)
        return True
    except TopicError:
        return False


ids = st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
                st.text(min_size=1, max_size=64).filter(_valid_id))
u64 = st.integers(0, U64_MAX)


@st.composite
def frames(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    tensor = draw(hnp.arrays(dtype, shape))  # floats include NaN, inf, -0.0
    common = dict(request_id=draw(u64), device_id=draw(ids), bundle_id=draw(st.binary(min_size=8, max_size=8)).hex(),
                  seq=draw(u64), t_send_us=draw(u64))
    if draw(st.booleans()):
        quant = {}
        if np.dtype(dtype).kind in "iu" and draw(st.booleans()):
            info = np.iinfo(dtype)
            quant = dict(scale=draw(st.floats(1e-30, 1e30)), zero_point=draw(st.integers(int(info.min), int(info.max))))
        return Frame.features(tensor, **common, **quant)
    classes = tensor.shape[-1] if tensor.ndim and tensor.shape[-1] else 2**31
    error = draw(st.none() | st.text(max_size=80))
    label = draw(st.integers(0, classes - 1)) if error is None else draw(st.none() | st.integers(0, classes - 1))
    return Frame("result", tensor=tensor, t_recv_us=draw(u64), t_done_us=draw(u64), label=label, error=error,
                 **common)


def decodes_or_frame_error(payload, **kw):
    """The decoder's contract: a valid Frame or a FrameError, nothing else."""
    try:
        frame = decode_frame(payload, **kw)
    except FrameError as e:
        assert e.reason and e.message
        return None
    assert isinstance(frame, Frame)
    return frame


@SETTINGS
@given(frames(), st.sampled_from(["raw", "zstd", "auto"]), st.booleans())
def test_any_valid_frame_round_trips(frame, compress, signed):
    key = KEY if signed else None
    back = decode_frame(encode_frame(frame, compress=compress, key=key), key=key)
    assert back == frame
    assert back.tensor.tobytes() == frame.tensor.tobytes()


@CHEAP
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_frame_error(data):
    decodes_or_frame_error(data)
    decodes_or_frame_error(b"ES\x01" + data)
    decodes_or_frame_error(b"ES\x01" + data, key=KEY)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, U64_MAX) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=20)


@SETTINGS
@given(st.sampled_from([1, 2, 0, 3]), st.lists(msgpack_values, max_size=17), st.binary(max_size=200))
def test_random_headers_raise_only_frame_error(tag, fields, body):
    header = msgspec.msgpack.encode([tag, *fields])
    decodes_or_frame_error(b"ES\x01" + struct.pack("<H", len(header)) + header + body)


@st.composite
def mutations(draw, payload):
    how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
    i = draw(st.integers(0, len(payload) - 1))
    if how == "flip":
        out = bytearray(payload)
        out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if how == "truncate":
        return payload[:i]
    if how == "insert":
        return payload[:i] + draw(st.binary(min_size=1, max_size=16)) + payload[i:]
    if how == "delete":
        return payload[:i] + payload[i + draw(st.integers(1, 16)):]
    chunk = draw(st.binary(min_size=1, max_size=8))
    out = payload[:i] + chunk + payload[i + len(chunk):]
    return out if out != payload else payload[:i]


@SETTINGS
@given(st.data(), frames(), st.sampled_from(["raw", "zstd"]))
def test_mutated_frames_raise_only_frame_error(data, frame, compress):
    payload = encode_frame(frame, compress=compress)
    for _ in range(MUTATIONS_PER_FRAME):
        decodes_or_frame_error(data.draw(mutations(payload)))


@SETTINGS
@given(st.data(), frames(), st.sampled_from(["raw", "zstd"]))
def test_any_mutation_of_a_signed_frame_is_refused(data, frame, compress):
    payload = encode_frame(frame, compress=compress, key=KEY)
    for _ in range(MUTATIONS_PER_FRAME):
        mutated = data.draw(mutations(payload))
        assert mutated != payload
        assert decodes_or_frame_error(mutated, key=KEY) is None


def test_every_truncation_and_every_header_bit_flip_of_a_signed_pool2_frame_is_refused():
    tensor = np.random.default_rng(0).integers(-128, 128, (1, 7, 7, 64), dtype=np.int8)
    frame = Frame.features(tensor, request_id=9, device_id="pi-01", bundle_id="0123456789abcdef", seq=3,
                           scale=0.02, zero_point=-128)
    payload = encode_frame(frame, key=KEY)
    for n in range(len(payload)):
        assert decodes_or_frame_error(payload[:n], key=KEY) is None
    header_end = 5 + int.from_bytes(payload[3:5], "little")
    for i in range(header_end + 8):
        for bit in range(8):
            flipped = bytearray(payload)
            flipped[i] ^= 1 << bit
            assert decodes_or_frame_error(bytes(flipped), key=KEY) is None
            decodes_or_frame_error(bytes(flipped))  # unsigned reading: a Frame or a FrameError
