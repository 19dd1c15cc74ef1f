"""Issue 4: 10,000 random and mutated payloads published to the features topic of a real Mosquitto.

The worker stays up, every payload is answered or dead-lettered (counted exactly: received ==
answered + errors + dead-lettered), none crashes it, and good traffic keeps being answered.
"""
from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pytest

from protocol import topics
from protocol.frame import Frame, decode_frame, encode_frame
from protocol.mqtt import MqttClient

pytestmark = pytest.mark.timeout(240)
FLEET = "lab"
HOSTILE = Path(__file__).resolve().parents[1] / "data" / "hostile_frames"


def _payloads(b, n, rng):
    """``n`` random or mutated payloads; every frame-shaped one carries its own random request id."""
    spec = b.manifest.feature
    tensors = [rng.integers(-128, 128, size=spec.shape, dtype=np.int8) for _ in range(16)]
    hostile = [p.read_bytes() for p in sorted(HOSTILE.glob("*.bin"))]

    def seed():
        f = Frame.features(tensors[int(rng.integers(0, 16))], request_id=int(rng.integers(0, 2**63)),
                           device_id="fz", bundle_id=b.bundle_id, seq=int(rng.integers(0, 2**32)),
                           scale=spec.scale, zero_point=spec.zero_point)
        return bytearray(encode_frame(f, compress=("raw", "zstd")[int(rng.integers(0, 2))]))

    out = []
    for k in range(n):
        kind = k % 8
        if kind == 0:                                   # noise of any length
            out.append(rng.bytes(int(rng.integers(0, 1500))))
            continue
        if kind == 1:                                   # the hand-made hostile examples, over and over
            out.append(hostile[k // 8 % len(hostile)])
            continue
        p = seed()
        header_end = 5 + int.from_bytes(p[3:5], "little")
        if kind in (2, 3):                              # bit flips anywhere
            for _ in range(int(rng.integers(1, 8))):
                p[int(rng.integers(0, len(p)))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 4:                                 # bit flips in the prefix and header only
            for _ in range(int(rng.integers(1, 4))):
                p[int(rng.integers(0, header_end))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 5:                                 # truncated or extended
            p = p[:int(rng.integers(0, len(p)))] if rng.random() < 0.7 else p + rng.bytes(int(rng.integers(1, 64)))
        elif kind == 6:                                 # random bytes spliced into the header
            at = int(rng.integers(5, header_end))
            p[at:at + int(rng.integers(1, 6))] = rng.bytes(int(rng.integers(0, 6)))
        else:                                           # a byte set to an extreme value
            p[int(rng.integers(0, header_end))] = int(rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xFF]))
        out.append(bytes(p))
    return out


def test_ten_thousand_random_and_mutated_payloads(mosquitto_broker, tiny_bundle, cloud_command, collect):
    b, url = tiny_bundle, mosquitto_broker.url
    # the worker in its own process, as `edgesplit cloud` runs it: it gets a core of its own
    cloud = cloud_command(url, b.root, "--group", "fuzz", "--max-batch", 64)
    n = 10_000
    payloads = _payloads(b, n, np.random.default_rng(4))
    spec = b.manifest.feature
    good = [encode_frame(Frame.features(np.full(spec.shape, i % 100, np.int8), request_id=i, device_id="d1",
                                        bundle_id=b.bundle_id, seq=i, scale=spec.scale, zero_point=spec.zero_point))
            for i in range(101)]
    out = collect(url, topics.results(FLEET, "fz"), topics.results(FLEET, "d1"), topics.all_dead_letters("+"))
    cloud.wait_ready()

    pub = MqttClient(url)          # a small in-flight window: paho scans it on every PUBACK
    assert pub.start(wait_connected=10)
    try:
        t0 = time.monotonic()
        for k, p in enumerate(payloads):
            pub.publish(topics.features(FLEET, "fz"), p)
            if k % 100 == 0:       # good traffic from another device, interleaved
                pub.publish(topics.features(FLEET, "d1"), good[k // 100])
        total = n + 100
        # one answer or one dead letter for each payload
        assert out.wait(0, 0, 0, timeout=1)
        deadline = time.monotonic() + 180
        while sum(out.count(f) for f in out.got) < total and time.monotonic() < deadline:
            assert cloud.proc.poll() is None, "the worker died:\n" + "".join(cloud.err)
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        # the worker is still up and serving
        pub.publish(topics.features(FLEET, "d1"), good[100])
        assert out.wait(0, 101, timeout=30)
    finally:
        pub.stop()
    st = cloud.stop()["total"]
    time.sleep(0.2)
    # exact accounting: every payload the broker delivered is answered, an error result, or dead-lettered
    assert st["received"] == total + 1, st
    assert st["received"] == st["answered"] + st["errors"] + st["dead_lettered"], st
    assert st["duplicates"] == 0 and st["errors"] == 0 and "internal-error" not in st["reasons"], st
    assert st["dead_lettered"] >= n // 2           # noise, hostile examples, header damage, truncation...
    # what arrived on the broker says the same
    assert out.count(topics.results(FLEET, "fz")) + 101 == st["answered"]
    assert out.count(topics.all_dead_letters("+")) == st["dead_lettered"]
    assert sum(st["reasons"].values()) == st["dead_lettered"]
    # good traffic was answered, each request once, with the right answer
    got = sorted(decode_frame(p).request_id for _, p in out.got[topics.results(FLEET, "d1")])
    assert got == list(range(101))
    why = collections.Counter(st["reasons"])
    print(f"\n{n} hostile payloads + 100 good in {seconds:.1f} s ({total / seconds:.0f} frames/s): "
          f"answered {st['answered']}, dead-lettered {st['dead_lettered']}: {dict(why.most_common())}")
