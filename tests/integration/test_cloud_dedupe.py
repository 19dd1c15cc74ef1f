"""Exactly-once answers on a real Mosquitto: a re-sent request runs the tail once, and a device
that missed its answer gets the same answer again."""
from __future__ import annotations

import time

import numpy as np
import pytest

from protocol import topics
from protocol.frame import Frame, decode_frame, encode_frame
from protocol.mqtt import MqttClient

pytestmark = pytest.mark.timeout(120)
FLEET = "lab"


def _frame(b, rid, seq, device="d1"):
    spec = b.manifest.feature
    rng = np.random.default_rng(rid)
    return Frame.features(rng.integers(-128, 128, size=spec.shape, dtype=np.int8), request_id=rid, device_id=device,
                          bundle_id=b.bundle_id, seq=seq, scale=spec.scale, zero_point=spec.zero_point)


def _settle(worker, n, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (worker.stats.received >= n and worker.stats.settled >= n):
        time.sleep(0.02)
    time.sleep(0.3)          # anything extra would show up now


def test_resends_run_the_tail_once_and_a_missed_answer_is_sent_again(mosquitto_broker, tiny_bundle, start_worker,
                                                                     collect):
    b, url = tiny_bundle, mosquitto_broker.url
    # a long batching wait: an original and its immediate re-send meet in one batch
    worker = start_worker(url, b, group="dd", max_batch=64, max_wait_ms=300)
    results = collect(url, topics.results(FLEET, "d1"))
    dev = MqttClient(url, max_inflight=1000)
    assert dev.start(wait_connected=10)
    try:
        n = 40
        # every request sent twice back to back, as a device re-sending after a reconnect does:
        # new frame (new seq and send time), same request id
        for rid in range(n):
            dev.publish(topics.features(FLEET, "d1"), encode_frame(_frame(b, rid, seq=2 * rid)))
            dev.publish(topics.features(FLEET, "d1"), encode_frame(_frame(b, rid, seq=2 * rid + 1)))
        assert results.wait(n, timeout=60)
        _settle(worker, 2 * n)
        st = worker.stats
        assert st.received == 2 * n and st.answered == n and st.duplicates == n and st.dead_lettered == 0
        assert st.batched_frames == n, "the tail ran more than once for a request"
        ids = [decode_frame(p).request_id for _, p in results.got[topics.results(FLEET, "d1")]]
        assert sorted(set(ids)) == list(range(n))
        assert len(ids) == n + st.republished        # a second answer only where it was re-published

        # The device missed the answer to request 3 (say, the broker restarted without persistence)
        # and re-sends it a while later: it gets the same answer, and the tail does not run again.
        first = [p for _, p in results.got[topics.results(FLEET, "d1")] if decode_frame(p).request_id == 3][0]
        before = results.count(topics.results(FLEET, "d1"))
        dev.publish(topics.features(FLEET, "d1"), encode_frame(_frame(b, 3, seq=1000)))
        assert results.wait(before + 1, timeout=30)
        again = results.got[topics.results(FLEET, "d1")][before][1]
        assert again == first
        _settle(worker, 2 * n + 1)
        assert worker.stats.batched_frames == n and worker.stats.republished >= 1
        assert "duplicates" in worker.stats.line()
    finally:
        dev.stop()


def test_a_request_id_is_per_device(mosquitto_broker, tiny_bundle, start_worker, collect):
    """Two devices that happen to use the same request id both get an answer."""
    b, url = tiny_bundle, mosquitto_broker.url
    worker = start_worker(url, b, group="dd2")
    results = collect(url, topics.results(FLEET, "a"), topics.results(FLEET, "b"))
    dev = MqttClient(url)
    assert dev.start(wait_connected=10)
    try:
        for d in ("a", "b"):
            dev.publish(topics.features(FLEET, d), encode_frame(_frame(b, 42, seq=1, device=d)))
        assert results.wait(1, 1, timeout=30)
        _settle(worker, 2)
        assert worker.stats.answered == 2 and worker.stats.duplicates == 0
    finally:
        dev.stop()
