"""Signed frames on a real Mosquitto: a worker with per-device keys answers its devices and
dead-letters forged, unsigned, replayed, stale and strangers' frames — 10,000 of them without
slowing good traffic down to a stop."""
from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from protocol import signing, topics
from protocol.errors import UsageError
from protocol.frame import Frame, decode_frame, encode_frame, now_us
from protocol.mqtt import MqttClient

pytestmark = pytest.mark.timeout(240)
FLEET = "lab"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_TENSORS: dict = {}


def _frame(b, rid, device, seq, t_send_us=None):
    spec = b.manifest.feature
    if b.bundle_id not in _TENSORS:
        rng = np.random.default_rng(0)
        _TENSORS[b.bundle_id] = [rng.integers(-128, 128, size=spec.shape, dtype=np.int8) for _ in range(16)]
    return Frame.features(_TENSORS[b.bundle_id][rid % 16], request_id=rid, device_id=device, bundle_id=b.bundle_id,
                          seq=seq, scale=spec.scale, zero_point=spec.zero_point, t_send_us=t_send_us)


def test_ten_thousand_bad_frames_do_not_stop_good_traffic(mosquitto_broker, tiny_bundle, cloud_command, collect,
                                                         tmp_path):
    b, url = tiny_bundle, mosquitto_broker.url
    good_key = signing.write_key(tmp_path / "keys" / "pi-good.key")
    signing.write_key(tmp_path / "keys" / "pi-other.key")
    stranger_key = signing.generate_key()
    # the worker in its own process, as `edgesplit cloud --keys DIR` runs it
    cloud = cloud_command(url, b.root, "--group", "signed", "--keys", tmp_path / "keys")
    feats = topics.features(FLEET, "pi-good")

    # --- what will be sent, built first so that publishing is one tight loop
    n_good, n_bad = 300, 10_000
    seq = iter(range(1, 10**9))
    good = [(feats, encode_frame(_frame(b, rid, "pi-good", next(seq)), key=good_key)) for rid in range(n_good)]
    kinds = ["bad-mac", "unsigned", "unknown-device", "replay", "stale"]
    rng = np.random.default_rng(0)
    stream, expected = [], collections.Counter()
    g = 0
    for i in range(n_bad):
        if i % (n_bad // n_good) == 0 and g < n_good:
            stream.append(good[g])
            g += 1
        kind = kinds[i % len(kinds)]
        rid = 1_000_000 + i
        if kind == "bad-mac":            # a signed frame altered on the way (one bit of the tensor)
            p = bytearray(encode_frame(_frame(b, rid, "pi-good", next(seq)), key=good_key, compress="raw"))
            p[-1 - int(rng.integers(0, 700))] ^= 1 << int(rng.integers(0, 8))
            stream.append((feats, bytes(p)))
        elif kind == "unsigned":         # no MAC at all
            stream.append((feats, encode_frame(_frame(b, rid, "pi-good", next(seq)))))
        elif kind == "unknown-device":   # a device the worker has no key for, signing with its own
            stream.append((topics.features(FLEET, "stranger"),
                           encode_frame(_frame(b, rid, "stranger", next(seq)), key=stranger_key)))
        elif kind == "replay":           # an exact copy of a good frame already sent
            stream.append(good[int(rng.integers(0, g))])
        else:                            # correctly signed, but sent an hour ago
            stream.append((feats, encode_frame(_frame(b, rid, "pi-good", next(seq),
                                                      t_send_us=now_us() - 3600 * 10**6), key=good_key)))
        expected["bad-mac" if kind == "unsigned" else kind] += 1
    assert g == n_good and sum(expected.values()) == n_bad

    out = collect(url, topics.results(FLEET, "pi-good"), topics.all_dead_letters(FLEET))
    cloud.wait_ready()
    pub = MqttClient(url)          # a small in-flight window: paho scans it on every PUBACK
    assert pub.start(wait_connected=10)
    try:
        t0 = time.monotonic()
        for topic, payload in stream:
            pub.publish(topic, payload)
        assert out.wait(n_good, n_bad, timeout=180), \
            f"{out.count(topics.results(FLEET, 'pi-good'))} results, {out.count(topics.all_dead_letters(FLEET))} " \
            f"dead letters:\n" + "".join(cloud.err[-20:])
        seconds = time.monotonic() - t0
        assert cloud.proc.poll() is None, "the worker died"
    finally:
        pub.stop()
    st = cloud.stop()["total"]
    # every bad frame dead-lettered with its reason and counted; every good one answered once
    assert st["received"] == n_good + n_bad == st["answered"] + st["dead_lettered"], st
    assert st["answered"] == n_good and st["dead_lettered"] == n_bad and st["duplicates"] == 0, st
    assert st["reasons"] == dict(expected), st["reasons"]
    letters = [topics.decode_dead_letter(p) for _, p in out.got[topics.all_dead_letters(FLEET)]]
    assert collections.Counter(d.reason for d in letters) == expected
    assert all(d.detail and d.worker for d in letters)
    results = [decode_frame(p, key=good_key) for _, p in out.got[topics.results(FLEET, "pi-good")]]
    assert sorted(r.request_id for r in results) == list(range(n_good))   # the answers are signed too
    print(f"\n{n_bad} bad + {n_good} good signed frames in {seconds:.1f} s ({(n_bad + n_good) / seconds:.0f} "
          f"frames/s): dead-lettered {dict(expected)}")


def test_a_resend_is_a_new_signed_frame_not_a_replay(mosquitto_broker, tiny_bundle, start_worker, collect):
    """A device re-sending a request (new seq and time, same id) is served, not dead-lettered."""
    b, url = tiny_bundle, mosquitto_broker.url
    key = signing.generate_key()
    worker = start_worker(url, b, group="signed2", keys={"pi-1": key})
    out = collect(url, topics.results(FLEET, "pi-1"), topics.all_dead_letters(FLEET))
    pub = MqttClient(url)
    assert pub.start(wait_connected=10)
    try:
        pub.publish(topics.features(FLEET, "pi-1"), encode_frame(_frame(b, 5, "pi-1", 1), key=key))
        assert out.wait(1, timeout=30)
        pub.publish(topics.features(FLEET, "pi-1"), encode_frame(_frame(b, 5, "pi-1", 2), key=key))
        assert out.wait(2, timeout=30)
        time.sleep(0.3)
        assert out.count(topics.all_dead_letters(FLEET)) == 0
        assert worker.stats.answered == 1 and worker.stats.republished == 1
    finally:
        pub.stop()


class _RevokedAfterEachCheck:
    """A key store (a KeySource callable) from which the device's key is gone again right after the
    worker has checked each of its frames, as when an operator revokes a device while its request is
    being served: the worker then holds an answer it cannot sign."""

    def __init__(self, key: bytes):
        self.key, self.lookups, self.lock = key, 0, threading.Lock()

    def __call__(self, device_id: str):
        with self.lock:
            self.lookups += 1
            return self.key if self.lookups % 2 else None


def test_an_answer_the_worker_cannot_sign_is_counted_and_never_sent_unsigned(mosquitto_broker, tiny_bundle,
                                                                            start_worker, collect, caplog):
    b, url = tiny_bundle, mosquitto_broker.url
    key = signing.generate_key()
    caplog.set_level(logging.INFO, logger="cloud.worker")
    worker = start_worker(url, b, group="unsignable", keys=_RevokedAfterEachCheck(key))
    out = collect(url, topics.results(FLEET, "pi-1"), topics.all_dead_letters(FLEET))
    pub = MqttClient(url)
    assert pub.start(wait_connected=10)
    try:
        for rid in range(1, 4):              # one at a time: each frame's check, then its answer
            pub.publish(topics.features(FLEET, "pi-1"), encode_frame(_frame(b, rid, "pi-1", rid), key=key))
            deadline = time.monotonic() + 30
            while worker.stats.errors < rid and time.monotonic() < deadline:
                time.sleep(0.02)
            assert worker.stats.errors == rid, worker.stats.line()
        time.sleep(0.5)                      # an answer published anyway would have arrived by now
    finally:
        pub.stop()
    assert out.count(topics.results(FLEET, "pi-1")) == 0, "an answer went out although it could not be signed"
    assert out.count(topics.all_dead_letters(FLEET)) == 0          # the frames were good
    st = worker.stats
    assert (st.received, st.answered, st.errors, st.sign_failures) == (3, 0, 3, 3), st.line()
    assert "answers withheld (could not sign) 3" in st.line()
    said = [r for r in caplog.records if r.name == "cloud.worker" and "cannot sign" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, [r.getMessage() for r in said]
    assert "'pi-1'" in said[0].getMessage() and "never sending it unsigned" in said[0].getMessage()


def test_load_keys_from_a_directory_and_files(tmp_path):
    from cloud.worker import load_keys

    d = tmp_path / "keys"
    k1 = signing.write_key(d / "pi-001.key")
    k2 = signing.write_key(tmp_path / "pi-002.key")
    assert load_keys(d) == {"pi-001": k1}
    assert load_keys([d, tmp_path / "pi-002.key"]) == {"pi-001": k1, "pi-002": k2}
    (tmp_path / "frame.txt").write_text(k1.hex())
    with pytest.raises(UsageError, match="<device-id>.key"):
        load_keys(tmp_path / "frame.txt")
    with pytest.raises(UsageError, match="does not exist"):
        load_keys(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no <device-id>.key"):
        load_keys(tmp_path / "empty")


def test_cloud_command_with_keys_refuses_unsigned_frames(mosquitto_broker, tiny_bundle, collect, tmp_path):
    """`edgesplit cloud --keys DIR` as a user runs it."""
    b, url = tiny_bundle, mosquitto_broker.url
    key = signing.write_key(tmp_path / "keys" / "pi-1.key")
    out = collect(url, topics.results(FLEET, "pi-1"), topics.all_dead_letters(FLEET))
    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "cloud", "--bundle", str(b.root), "--broker", url,
                             "--keys", str(tmp_path / "keys"), "--stats-every", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub = MqttClient(url)
    assert pub.start(wait_connected=10)
    try:
        # send until the worker is up (frames before its subscription are not delivered to anyone)
        deadline = time.monotonic() + 60
        rid = 0
        while out.count(topics.results(FLEET, "pi-1")) == 0 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            rid += 1
            pub.publish(topics.features(FLEET, "pi-1"), encode_frame(_frame(b, rid, "pi-1", rid), key=key))
            time.sleep(0.5)
        assert out.count(topics.results(FLEET, "pi-1")) > 0
        pub.publish(topics.features(FLEET, "pi-1"), encode_frame(_frame(b, 999, "pi-1", 999)))
        assert out.wait(1, 1, timeout=30)
        letter = topics.decode_dead_letter(out.got[topics.all_dead_letters(FLEET)][0][1])
        assert letter.reason == "bad-mac" and "not signed" in letter.detail
    finally:
        pub.stop()
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "dead-lettered 1 (bad-mac 1)" in stdout
