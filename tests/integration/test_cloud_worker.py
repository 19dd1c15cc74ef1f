"""The cloud worker against real brokers, a real converted bundle and a real LiteRT tail.

(10,000 random and mutated payloads: test_hostile_payloads.py; signed frames: test_signed_frames.py;
re-sent requests: test_cloud_dedupe.py; a worker killed mid-stream: test_cloud_kill.py.)
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from protocol import topics
from protocol.frame import Frame, decode_frame, encode_frame
from protocol.mqtt import Backoff, MqttClient

pytestmark = pytest.mark.timeout(240)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLEET = "lab"


@pytest.fixture(scope="module")
def cloud_bundle(tiny_bundle):
    """A real bundle made by the real converter (a tiny CNN cut at pool1, int8): answers are checked
    against its tail run frame by frame, not against labels."""
    return tiny_bundle


def _features(b, n, device="d1", seed=0, start=0):
    spec = b.manifest.feature
    rng = np.random.default_rng(seed)
    frames = [Frame.features(rng.integers(-128, 128, size=spec.shape, dtype=np.int8), request_id=start + i,
                             device_id=device, bundle_id=b.bundle_id, seq=start + i, scale=spec.scale,
                             zero_point=spec.zero_point) for i in range(n)]
    return frames


def _expected(b, frames):
    """Tail output per frame, one frame at a time (the worker batches; the answers must not change)."""
    from runtime.interpreter import Model

    tail = Model(b.tail_path)
    spec = b.manifest.feature
    return {f.request_id: tail.run_float(spec.dequantize(f.tensor)[None])[0] for f in frames}


class Device:
    """A test device: publishes on its features topic, collects results and dead letters."""

    def __init__(self, url, device="d1"):
        self.device = device
        self.results: list[Frame] = []
        self.dead: list = []
        self.lock = threading.Lock()
        self.client = MqttClient(url, backoff=Backoff(0.1, 0.5), max_inflight=1000)
        self.client.subscribe(topics.results(FLEET, device), self._on_result)
        self.client.subscribe(topics.dead_letter(FLEET, device), self._on_dead)
        assert self.client.start(wait_connected=10)

    def _on_result(self, topic, payload):
        with self.lock:
            self.results.append(decode_frame(payload))

    def _on_dead(self, topic, payload):
        with self.lock:
            self.dead.append(topics.decode_dead_letter(payload))

    def send(self, payload: bytes):
        return self.client.publish(topics.features(FLEET, self.device), payload)

    def wait(self, results=0, dead=0, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.results) >= results and len(self.dead) >= dead:
                    return True
            time.sleep(0.02)
        return False


def _malformed(b):
    """(reason, payload) pairs a worker must dead-letter."""
    spec = b.manifest.feature
    good = _features(b, 1, seed=9, start=10_000)[0]
    raw = encode_frame(good, compress="raw")
    t = good.tensor
    mk = lambda **kw: encode_frame(good.replace(**kw), compress="raw")  # noqa: E731
    return [
        ("bad-magic", b"garbage"),
        ("truncated", b""),
        ("bad-size", raw[:-10]),
        ("unknown-bundle", mk(bundle_id="0123456789abcdef")),
        ("bad-shape", mk(tensor=t.reshape(-1)[: t.size // 2].reshape(7, 7, -1))),
        ("bad-dtype", mk(tensor=t.astype(np.float32), scale=None, zero_point=None)),
        ("bad-quantization", mk(scale=spec.scale * 2)),
        ("device-mismatch", mk(device_id="someone-else")),
        ("wrong-kind", encode_frame(Frame.result(good, np.ones(10, np.float32) / 10, t_recv_us=1))),
    ]


def test_worker_answers_good_frames_and_dead_letters_bad_ones(broker, cloud_bundle):
    from cloud import Registry, Worker

    b = cloud_bundle
    worker = Worker(Registry.load([b.root]), broker.url, group="g1", max_batch=16, max_wait_ms=5,
                    backoff=Backoff(0.1, 0.5))
    assert worker.start(wait_connected=10)
    dev = Device(broker.url)
    try:
        good = _features(b, 120)
        bad = _malformed(b)
        # good and bad interleaved: bad input must not stop the good from being answered
        sent_bad = 0
        for i, f in enumerate(good):
            dev.send(encode_frame(f))
            if i % 12 == 0 and sent_bad < len(bad):
                dev.send(bad[sent_bad][1])
                sent_bad += 1
        assert dev.wait(results=len(good), dead=len(bad), timeout=90), \
            f"got {len(dev.results)} results, {len(dev.dead)} dead letters; worker: {worker.stats.line()}"
        time.sleep(0.5)   # let any duplicate arrive

        ids = [r.request_id for r in dev.results]
        assert sorted(ids) == [f.request_id for f in good], "a request was lost, duplicated or mis-numbered"
        expected = _expected(b, good)
        for r in dev.results:
            assert r.kind == "result" and r.ok and r.device_id == "d1" and r.bundle_id == b.bundle_id
            np.testing.assert_allclose(r.tensor, expected[r.request_id], rtol=1e-5, atol=1e-6)
            assert r.label == int(np.argmax(expected[r.request_id]))
            assert r.t_done_us >= r.t_recv_us

        reasons = collections.Counter(d.reason for d in dev.dead)
        assert reasons == collections.Counter(reason for reason, _ in bad)
        for d in dev.dead:
            assert d.topic == topics.features(FLEET, "d1") and d.detail and len(d.payload) <= 256
        st = worker.stats
        assert (st.received, st.answered, st.dead_lettered) == (len(good) + len(bad), len(good), len(bad))
        assert st.reasons == reasons
        assert st.batches >= 1 and st.batched_frames == len(good)
    finally:
        dev.client.stop()
        worker.stop()


def _total(summary: str) -> dict:
    m = re.search(r"total: received (\d+), answered (\d+), dead-lettered (\d+)", summary)
    assert m, summary
    return dict(zip(("received", "answered", "dead_lettered"), map(int, m.groups())))


def test_sigterm_drains_in_flight_work_and_exits_0(mosquitto_broker, cloud_bundle, cloud_command):
    b = cloud_bundle
    cloud = cloud_command(mosquitto_broker.url, b.root, "--max-wait-ms", "5", json=False)
    dev = Device(mosquitto_broker.url)
    try:
        cloud.wait_ready()
        frames = _features(b, 400, seed=5)
        for f in frames:
            dev.send(encode_frame(f))
        assert dev.wait(results=20, timeout=60)    # mid-stream
        out = cloud.stop()
        total = _total(out)
        assert total["answered"] == total["received"] > 0, f"frames received but not answered:\n{out}"
        time.sleep(1.0)
        with dev.lock:
            got = len(dev.results)
        assert got == total["answered"], "an answered frame never reached the device"
    finally:
        cloud.kill()
        dev.client.stop()


def test_two_worker_processes_split_the_load(broker, cloud_bundle, cloud_command):
    b = cloud_bundle
    cloud = cloud_command(broker.url, b.root, "--workers", "2", "--group", "pair", json=False)
    dev = Device(broker.url)
    try:
        cloud.wait_ready(n_workers=2)
        frames = _features(b, 300, seed=11)
        for f in frames:
            dev.send(encode_frame(f))
        assert dev.wait(results=len(frames), timeout=120), len(dev.results)
        time.sleep(0.5)
        ids = sorted(r.request_id for r in dev.results)
        assert ids == [f.request_id for f in frames], "lost or duplicated answers"
        out = cloud.stop()
        per = [int(m) for m in re.findall(r"worker \d+: received \d+, answered (\d+)", out)]
        assert len(per) == 2 and sum(per) == len(frames), out
        assert min(per) > 0, f"one worker did all the work: {per}"
    finally:
        cloud.kill()
        dev.client.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_refused_credentials_exit_78_with_one_message(make_mosquitto, cloud_bundle, workers):
    b = make_mosquitto(users={"cloud": "right"})
    url = b.url.replace("mqtt://", "mqtt://cloud:wrong@")
    proc = subprocess.run([sys.executable, "-m", "edgesplit", "cloud", "--bundle", str(cloud_bundle.root),
                           "--broker", url, "--workers", str(workers)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.count("refused the connection") == 1, proc.stderr
    assert "wrong" not in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_password_file_keeps_the_password_off_the_command_line(make_mosquitto, cloud_bundle, cloud_command, tmp_path,
                                                                workers):
    b = make_mosquitto(users={"cloud": "s3cret-pw", "dev": "devpw"})
    pw = tmp_path / "broker-password"
    pw.write_text("s3cret-pw\n")                      # as `edgesplit broker config` writes it: one line
    url = b.url.replace("mqtt://", "mqtt://cloud@")
    cloud = cloud_command(url, cloud_bundle.root, "--password-file", pw, "--workers", str(workers))
    dev = Device(b.url.replace("mqtt://", "mqtt://dev:devpw@"))
    try:
        cloud.wait_ready(n_workers=workers)
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in [cloud.proc.pid, *cloud.worker_pids()]]
        assert all(b"s3cret-pw" not in c for c in cmdlines), cmdlines
        frames = _features(cloud_bundle, 20, seed=5)
        for f in frames:
            dev.send(encode_frame(f))
        assert dev.wait(results=len(frames), timeout=60), len(dev.results)
        assert sorted(r.request_id for r in dev.results) == [f.request_id for f in frames]
    finally:
        cloud.kill()
        dev.client.stop()


@pytest.mark.parametrize("content, code, words", [(None, 2, "does not exist"), ("", 2, "is empty"),
                                                  ("wrong\n", 78, "refused the connection")])
def test_a_bad_password_file_is_one_clear_error(make_mosquitto, cloud_bundle, tmp_path, content, code, words):
    b = make_mosquitto(users={"cloud": "right"})
    pw = tmp_path / "pw"
    if content is not None:
        pw.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "edgesplit", "cloud", "--bundle", str(cloud_bundle.root),
                           "--broker", b.url.replace("mqtt://", "mqtt://cloud@"), "--password-file", str(pw)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr
